"""The Java scorers pycocoevalcap ships: METEOR 1.5 and SPICE 1.0, run without surprises.

Both are checked before use, so a missing Java, jar or model gives a reason string instead of a crash
or a download: `meteor_unavailable(lang)` and `spice_unavailable(lang)` return None when the metric
can run and otherwise say why.

METEOR
  English: exactly pycocoevalcap's settings (`-l en -norm`, exact + stem + synonym + paraphrase
  modules) on PTB tokens, so scores equal the standard COCO pipeline's.
  Other languages: `-l other -m exact -lower` on vicap's metric tokens: exact matches only, with
  METEOR's language-independent parameters. METEOR's stemmer, synonyms and paraphrases exist only for
  a few European languages, and its `-norm` tokenizer is written for them, so it is never applied to
  Vietnamese (which it would split at non-Latin-1 letters). These scores are comparable between
  systems scored by vicap, not with numbers computed by the English pipeline.
SPICE
  English only (it parses captions with Stanford CoreNLP's English models). Runs when Java, the SPICE
  jar and the Stanford CoreNLP 3.6.0 jars are present locally; pycocoevalcap would download CoreNLP
  on first use, vicap never does.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from vicap.errors import MetricError  # noqa: F401  (raised here; importable from here too)

log = logging.getLogger(__name__)

CORENLP = "stanford-corenlp-3.6.0"


def _pycocoevalcap_dir() -> Path | None:
    try:
        import pycocoevalcap.bleu.bleu as bleu
    except ImportError:
        return None
    return Path(bleu.__file__).resolve().parents[1]


def java_executable() -> str | None:
    return shutil.which("java")


def meteor_jar() -> Path | None:
    root = _pycocoevalcap_dir()
    return root / "meteor" / "meteor-1.5.jar" if root else None


def meteor_options(language: str) -> list[str]:
    """METEOR command-line options for a language (see the module docstring)."""
    if language == "en":
        return ["-l", "en", "-norm"]
    return ["-l", "other", "-m", "exact", "-lower"]


def meteor_unavailable(language: str) -> str | None:
    if java_executable() is None:
        return (
            "unavailable: java not found on PATH (METEOR is a Java program; install a JRE, e.g. openjdk-17)"
        )
    jar = meteor_jar()
    if jar is None or not jar.is_file():
        return f"unavailable: METEOR jar not found (looked for {jar}; it ships with pycocoevalcap)"
    if language == "en" and not (jar.parent / "data" / "paraphrase-en.gz").is_file():
        return f"unavailable: {jar.parent / 'data' / 'paraphrase-en.gz'} missing (ships with pycocoevalcap)"
    return None


def meteor_description(language: str) -> str:
    opts = " ".join(meteor_options(language))
    if language == "en":
        return f"METEOR 1.5 ({opts}), pycocoevalcap's settings, on PTB tokens"
    return (
        f"METEOR 1.5 ({opts}): exact matches only, language-independent parameters, on vicap's metric "
        "tokens; comparable across systems scored by vicap, not with English-pipeline METEOR"
    )


class Meteor:
    """A METEOR 1.5 process speaking pycocoevalcap's stdio protocol; reuse one for many scorings."""

    def __init__(self, language: str, *, timeout_s: float = 600.0) -> None:
        reason = meteor_unavailable(language)
        if reason:
            raise MetricError(reason)
        jar = meteor_jar()
        assert jar is not None
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile()
        # Exact-match scoring is short, so JIT warm-up dominates it: the C1-only JIT and the serial GC cut
        # a cold 4k-caption run from ~6 s to ~2 s on 2 cores. English loads a 60 MB paraphrase table
        # first, which the full JIT does faster. The flags change speed, not scores.
        jvm = ["-Dfile.encoding=UTF-8", "-Xmx2G"]
        if language != "en":
            jvm = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", *jvm]
        self._proc = subprocess.Popen(
            ["java", *jvm, "-jar", jar.name, "-", "-", "-stdio", *meteor_options(language)],
            cwd=jar.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def _fail(self, what: str) -> MetricError:
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace").strip()[-2000:]
        self.close()
        return MetricError(f"METEOR failed while {what}: {err or 'no error output'}")

    def _exchange(self, lines: list[str], n_out: int, what: str) -> list[str]:
        """Write `lines` from a thread while reading `n_out` answer lines (no pipe deadlock)."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        payload = "".join(line + "\n" for line in lines).encode("utf-8")
        error: list[BaseException] = []

        def write() -> None:
            try:
                self._proc.stdin.write(payload)
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                error.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        out = []
        for _ in range(n_out):
            line = self._proc.stdout.readline()
            if not line:
                raise self._fail(what)
            out.append(line.decode("utf-8").strip())
        writer.join(self.timeout_s)
        if error:
            raise self._fail(what)
        return out

    def compute(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
        """Corpus METEOR, as pycocoevalcap's Meteor.compute_score: per-image statistics, then one EVAL."""
        keys = list(gts)
        lines = []
        for k in keys:
            hyp = res[k][0].replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[k]), hyp)))
        stats = self._exchange(lines, len(keys), "scoring")
        answer = self._exchange(["EVAL ||| " + " ||| ".join(stats)], len(keys) + 1, "aggregating")
        return float(answer[-1])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()
            except OSError:
                pass
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> Meteor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spice_dir() -> Path | None:
    root = _pycocoevalcap_dir()
    return root / "spice" if root else None


def spice_unavailable(language: str) -> str | None:
    if language != "en":
        return (
            "not applicable: SPICE parses captions into scene graphs with Stanford CoreNLP's English "
            "models; there is none for this language"
        )
    if java_executable() is None:
        return "unavailable: java not found on PATH (SPICE is a Java program)"
    folder = spice_dir()
    if folder is None or not (folder / "spice-1.0.jar").is_file():
        return f"unavailable: spice-1.0.jar not found (looked in {folder}; it ships with pycocoevalcap)"
    missing = [f for f in (f"{CORENLP}.jar", f"{CORENLP}-models.jar") if not (folder / "lib" / f).is_file()]
    if missing:
        return (
            f"unavailable: SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {folder / 'lib'}, "
            "which pycocoevalcap downloads from nlp.stanford.edu on first use; vicap never downloads. "
            "To enable it, run once on a connected machine: python -c 'from pycocoevalcap.spice."
            "get_stanford_models import get_stanford_models; get_stanford_models()'"
        )
    return None


def spice_description() -> str:
    return "SPICE 1.0 (Stanford CoreNLP 3.6.0 scene graphs), on PTB tokens, mean of per-image F-scores"


def spice_score(gts: dict[str, list[str]], res: dict[str, list[str]], *, timeout_s: float = 3600.0) -> float:
    """SPICE as pycocoevalcap computes it (mean per-image F), run without its cache or any download.

    The jar's LMDB cache is left off: its native library fails on recent Java versions.
    """
    import numpy as np

    reason = spice_unavailable("en")
    if reason:
        raise MetricError(reason)
    folder = spice_dir()
    assert folder is not None
    keys = sorted(gts)
    with tempfile.TemporaryDirectory(prefix="vicap-spice-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(
            json.dumps([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in keys]), encoding="utf-8"
        )
        cmd = ["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(src), "-out", str(dst), "-subset", "-silent"]
        try:
            done = subprocess.run(cmd, cwd=folder, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise MetricError(f"SPICE did not finish within {timeout_s:.0f} s") from None
        if done.returncode != 0 or not dst.is_file():
            err = done.stderr.decode("utf-8", "replace").strip()[-2000:]
            raise MetricError(f"SPICE failed (exit {done.returncode}): {err}")
        results = json.loads(dst.read_text(encoding="utf-8"))

    def f(item) -> float:
        try:
            return float(item["scores"]["All"]["f"])
        except (TypeError, ValueError, KeyError):
            return float("nan")

    return float(np.mean([f(item) for item in results]))
