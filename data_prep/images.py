"""Image file checks: missing, unreadable, truncated. Decoded with PIL, in threads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def check_image(path: Path) -> tuple[str, str] | None:
    """None when `path` decodes fully, else (kind, message) with kind in
    missing_image / unreadable_image / truncated_image."""
    if not path.is_file():
        return "missing_image", f"no file {path}"
    try:
        with Image.open(path) as im:
            # A reduced-size JPEG decode still reads the whole stream (so truncation is caught)
            # at a fraction of the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
    except UnidentifiedImageError:
        return "unreadable_image", f"not an image PIL can read: {path}"
    except OSError as err:
        kind = "truncated_image" if "truncated" in str(err).lower() else "unreadable_image"
        return kind, f"{err} ({path})"
    except Exception as err:  # PIL raises assorted errors on corrupt data (ValueError, SyntaxError ...)
        return "unreadable_image", f"{type(err).__name__}: {err} ({path})"
    return None


def check_images(paths: Sequence[Path], workers: int = 8, decode: bool = True) -> dict[Path, tuple[str, str]]:
    """Check many images; returns only the bad ones. `decode=False` checks existence only."""
    if not decode:
        return {p: ("missing_image", f"no file {p}") for p in paths if not p.is_file()}
    bad: dict[Path, tuple[str, str]] = {}
    # PIL releases the GIL while decoding, so threads give a real speed-up.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check_image, paths)
        bar = tqdm(
            results, total=len(paths), desc="checking images", unit="img", disable=len(paths) < 200 or None
        )
        for path, res in zip(paths, bar, strict=True):
            if res is not None:
                bad[path] = res
    return bad
