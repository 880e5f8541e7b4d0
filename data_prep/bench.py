"""Time caption normalization and word segmentation on a COCO-format caption set.

python -m data_prep.bench /work/shared/data/uit-viic --lang vi
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from data_prep.languages import get_language

log = logging.getLogger(__name__)


def load_captions(source: Path) -> list[str]:
    """All `caption` strings of the COCO caption JSON files in `source` (a file or folder)."""
    files = [source] if source.is_file() else sorted(source.glob("*.json"))
    return [a["caption"] for f in files for a in json.loads(f.read_text(encoding="utf-8"))["annotations"]]


def bench(captions: list[str], lang: str, mode: str = "word") -> dict:
    """Captions per second for normalization, segmentation, and both; plus how many captions changed."""
    language = get_language(lang)
    language.segment_many(["khởi động"], mode)  # import and load the segmenter outside the timing
    t0 = time.perf_counter()
    normalized = [language.normalize(c) for c in captions]
    t1 = time.perf_counter()
    language.segment_many(normalized, mode)
    t2 = time.perf_counter()
    n = len(captions)
    return {
        "captions": n,
        "changed_by_normalize": sum(a != b for a, b in zip(captions, normalized, strict=True)),
        "normalize_s": round(t1 - t0, 3),
        "segment_s": round(t2 - t1, 3),
        "normalize_per_s": round(n / (t1 - t0)),
        "segment_per_s": round(n / (t2 - t1)),
        "both_per_s": round(n / (t2 - t0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("--lang", default="vi")
    parser.add_argument("--mode", default="word")
    args = parser.parse_args()
    print(json.dumps(bench(load_captions(args.source), args.lang, args.mode), indent=1))  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
