"""The torchvision guard: after `import vicap`, torchvision, open_clip, peft and transformers' models import.

Run in a fresh interpreter, because by the time pytest collects this file the test process has long
imported torchvision (through conftest) and the guard has nothing left to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FRESH = """
import sys
assert "torchvision" not in sys.modules

import importlib.util

import vicap
import vicap._compat as compat

# `import vicap` loads no torch (the CLI sets OpenMP's environment first); the guard waits for the
# first look-up of torchvision, and is idempotent before torchvision is imported (a second `define`
# of nms would raise) ...
assert "torch" not in sys.modules and not compat._GUARDED
importlib.util.find_spec("torchvision")
stubbed = compat._STUB_LIBRARY is not None
importlib.util.find_spec("torchvision")
compat.guard_torchvision()
assert compat._GUARDED and (compat._STUB_LIBRARY is None or stubbed)

import torchvision, open_clip, peft
from transformers import BloomForCausalLM, GPT2LMHeadModel

# ... and after.
lib = compat._STUB_LIBRARY
compat.guard_torchvision()
assert compat._STUB_LIBRARY is lib

# The pure-Python transforms vicap relies on work.
import torch
from PIL import Image
from torchvision import transforms as T
x = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])(Image.new("RGB", (20, 10), (255, 0, 0)))
assert tuple(x.shape) == (3, 8, 8) and float(x[0].min()) == 1.0

if stubbed:
    # A declared-but-unimplemented op fails loudly instead of returning something wrong.
    try:
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except (NotImplementedError, RuntimeError):
        pass
    else:
        raise AssertionError("stubbed nms returned a value")
print("GUARD-OK", "stubbed" if stubbed else "native")
"""


def test_import_order_works_in_a_fresh_interpreter() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, "-c", FRESH], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from vicap._compat import torchvision_ops_loadable

    # On machines whose torchvision ops do not load (the reason for the guard), the stub path ran.
    expected = "stubbed" if torchvision_ops_loadable() is False else "native"
    assert f"GUARD-OK {expected}" in res.stdout


def test_guard_is_a_no_op_once_torchvision_is_imported() -> None:
    import torchvision  # noqa: F401  (imported after vicap, as a user would)

    import vicap._compat as compat

    lib = compat._STUB_LIBRARY
    for _ in range(3):
        compat.guard_torchvision()
    assert compat._STUB_LIBRARY is lib
    assert compat._GUARDED
