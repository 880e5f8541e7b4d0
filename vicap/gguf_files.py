"""GGUF language models: a `.gguf` file (llama.cpp's single-file format, often quantized) as a decoder.

transformers reads GGUF files (`from_pretrained(folder, gguf_file=NAME)`), dequantizing every weight
into the requested dtype, which takes seconds to minutes for a real model. vicap does that once per
file and dtype and keeps the result as a normal Hugging Face folder (safetensors weights, tokenizer,
config) in its cache, keyed by the file's content (sha256), so every later load, in any process, reads
that folder. A changed file gets a new folder; a moved or copied one keeps its own.

The cache is `$VICAP_CACHE`, else `$XDG_CACHE_HOME/vicap`, else `~/.cache/vicap`; the converted
models are in its `gguf/` folder, one `SHA16-DTYPE` folder each, safe to delete.

Before transformers sees a file, vicap checks what it can name: that the `gguf` package is installed,
that the file is GGUF at all and complete, and that transformers reads its architecture.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from vicap.errors import ModelLoadError
from vicap.resolve import ModelRef, file_digest

log = logging.getLogger(__name__)

MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# GGUF architectures transformers reads that are not causal LMs (sequence-to-sequence models)
NOT_CAUSAL = {"t5", "t5encoder", "umt5"}


def cache_root() -> Path:
    """Where vicap caches what it derives from a user's files: $VICAP_CACHE, else $XDG_CACHE_HOME/vicap,
    else ~/.cache/vicap."""
    if os.environ.get("VICAP_CACHE"):
        return Path(os.environ["VICAP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "vicap"


def supported_architectures() -> list[str]:
    """The GGUF architectures (`general.architecture`) transformers can load as causal LMs."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    archs = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}  # those two are metadata sections
    try:  # the newer reader's own table (transformers >= 5.2x); older versions have only the first
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        archs |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(archs - NOT_CAUSAL)


def check_gguf(ref: ModelRef) -> str:
    """The architecture of the GGUF file `ref` names, after checking what can be named before transformers
    reads it: the `gguf` package, the file's magic bytes, a header and tensors the gguf reader can map
    (a truncated file fails there), an architecture transformers loads. Raises ModelLoadError naming
    the file."""
    file, where = ref.path, f"{ref.key} = {ref.name!r}"
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"{where}: reading GGUF files needs the gguf package; install it with "
            "`pip install 'vicap[gguf]'` (or `pip install gguf`)"
        )
    with open(file, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ModelLoadError(f"{where}: {file} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
    from gguf import GGUFReader

    try:  # the reader maps every tensor: a cut file fails here, in numpy or struct
        field = GGUFReader(file).get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:
        raise ModelLoadError(
            f"{where}: {file} could not be read as GGUF (truncated or damaged?): {type(e).__name__}: {e}"
        ) from e
    if not arch:
        raise ModelLoadError(f"{where}: {file} states no general.architecture; it is not a GGUF model file")
    known = supported_architectures()
    if arch not in known:
        raise ModelLoadError(
            f"{where}: {file} holds a {arch!r} model, which transformers cannot read from GGUF as a causal "
            f"LM; it reads {', '.join(known)}. Convert the original model with save_pretrained instead."
        )
    return str(arch)


def gguf_folder(ref: ModelRef, dtype: str) -> Path:
    """The cached Hugging Face folder of the GGUF file `ref` in `dtype` ('float32', 'bfloat16', ...),
    converting it first when it is not there yet. A conversion is written to a temporary folder and
    renamed into place when complete, so an interrupted one leaves nothing a later load would use."""
    from vicap.decoders import DTYPES

    file = ref.path
    digest = file_digest(file)
    folder = cache_root() / "gguf" / f"{digest[:16]}-{dtype}"
    if (folder / "config.json").is_file():
        log.info("decoder %s: GGUF file already converted to %s, using %s", ref.name, dtype, folder)
        return folder
    arch = check_gguf(ref)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("decoder %s: converting GGUF file %s (%s) to %s, once", ref.name, file, arch, dtype)
    parent, name = str(file.parent), file.name
    # dequantize=True: a plain dense model (no packed GGUF layers), which save_pretrained can write
    lm = AutoModelForCausalLM.from_pretrained(
        parent,
        gguf_file=name,
        dtype=DTYPES[dtype],
        local_files_only=True,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name, local_files_only=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": str(file.absolute()), "sha256": digest, "architecture": arch, "dtype": dtype}
        (tmp / "vicap_gguf.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    except BaseException:  # a full disk, a stop: no half-written model left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same conversion first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    log.info("decoder %s: converted GGUF saved as %s; later loads read that folder", ref.name, folder)
    return folder
