"""Image decoding with PIL: EXIF orientation applied, every mode converted to RGB, clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# One set of file and size checks (missing, link loop, not a regular file, the 100 MP limit) for
# `vicap prepare` and every stage that loads images, and one way to open a file or a tar member.
from data_prep.images import TarMember, file_problem, image_source, pixel_problem
from vicap.errors import ImageError  # noqa: F401  (raised here; importable from here too)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit grayscale ('I;16*', or 'I' as older Pillow opens 16-bit PNGs) -> 8-bit 'L'.

    PIL's convert('RGB') clips these values at 255 instead of rescaling them, which turns a 16-bit
    photo almost entirely white.
    """
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def load_image(path: str | Path | TarMember) -> Image.Image:
    """The image at `path` (a file, or a member of a tar shard read in place) as RGB; ImageError names
    the file and what is wrong with it."""
    path = path if isinstance(path, TarMember) else Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise ImageError(f"{path}: {problem[1]}")
    try:
        with warnings.catch_warnings():
            # vicap refuses over-limit images itself (below), with the file's name; PIL's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(image_source(path))
        with im:
            too_big = pixel_problem(im.width, im.height)
            if too_big:
                raise ImageError(f"{path}: {too_big}")
            im.load()  # decode now so truncated files fail here, not inside a batch
            im = ImageOps.exif_transpose(im)
            if im.mode == "I" or im.mode.startswith("I;16"):
                im = _high_bit_depth_to_l(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # composite transparency onto white rather than letting it turn black
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
