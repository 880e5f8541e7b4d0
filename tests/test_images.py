"""load_image: every PIL mode becomes RGB, EXIF orientation is applied, bad files name themselves."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_prep.images
from data_prep.images import check_image
from vicap.images import ImageError, load_image


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (6, 4), 77), tmp_path / "g.png"))
    assert out.mode == "RGB" and out.size == (6, 4)
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_one_bit_becomes_rgb(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("1", (5, 5), 1), tmp_path / "b.png"))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    # PIL's own convert("RGB") clips 16-bit values at 255, turning the whole image white.
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = _save(Image.fromarray(ramp), tmp_path / "g16.png")
    out = np.asarray(load_image(path))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert abs(float(out[..., 0].mean()) - 127.5) < 2  # still a ramp, not a white square
    assert (out[..., 0] == out[..., 2]).all()


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert all(v > 245 for v in out.getpixel((4, 4)))  # no ink -> white


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = load_image(_save(im, tmp_path / "p.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 200, 30)


def test_palette_transparency_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    out = load_image(_save(im, tmp_path / "pt.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(_save(im, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(v - 127) <= 2 for v in out.getpixel((2, 0)))


def test_la_composited_on_white(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("LA", (2, 2), (0, 0)), tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40x20, left half red, right half blue; Orientation=6 means "rotate 90 degrees clockwise".
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_save(im, tmp_path / "o.jpg", exif=exif, quality=95))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "x.jpg")
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg: unreadable image"):
        load_image(bad)


def test_text_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: unreadable image"):
        load_image(path)


def _loop(tmp: Path) -> Path:
    (tmp / "loop.jpg").symlink_to("loop.jpg")
    return tmp / "loop.jpg"


def _dangling(tmp: Path) -> Path:
    (tmp / "gone.jpg").symlink_to("nowhere.jpg")
    return tmp / "gone.jpg"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.jpg")  # opening it to read would wait forever for a writer
    return tmp / "pipe.jpg"


def _big(tmp: Path) -> Path:
    return _save(Image.new("RGB", (20, 20)), tmp / "big.png")  # over the limit the test sets: 399 pixels


# (case, make the file, kind `vicap prepare` reports, what the message says): the same checks on both sides
FILE_PROBLEMS = [
    ("missing", lambda tmp: tmp / "nowhere.png", "missing_image", r"nowhere\.png: image file not found"),
    ("folder", lambda tmp: tmp, "missing_image", r": a folder, not an image file"),
    ("symlink loop", _loop, "symlink_loop", r"loop\.jpg: symbolic link loop"),
    ("broken link", _dangling, "missing_image", r"gone\.jpg: broken symbolic link \(to nowhere\.jpg\)"),
    ("pipe", _fifo, "unreadable_image", r"pipe\.jpg: not a regular file"),
    ("over the pixel limit", _big, "oversized_image", r"big\.png: 20x20 is over the 399-pixel limit"),
]


@pytest.mark.parametrize(
    ("make", "kind", "message"), [c[1:] for c in FILE_PROBLEMS], ids=[c[0] for c in FILE_PROBLEMS]
)
def test_bad_files_name_themselves_in_loading_and_in_prepare(
    tmp_path: Path, monkeypatch, make, kind, message
) -> None:
    monkeypatch.setattr(data_prep.images, "MAX_PIXELS", 399)  # the one limit prepare and loading share
    path = make(tmp_path)
    with pytest.raises(ImageError, match=message):
        load_image(path)
    found_kind, found_message = check_image(path)
    assert found_kind == kind and str(path) in found_message
    # the message `vicap prepare` gives is the loader's reason, with the file named
    assert re.search(message.split(": ", 1)[-1], found_message)


def test_pixel_limit_is_not_below_real_images(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    assert load_image(path).size == (20, 20) and check_image(path) is None
