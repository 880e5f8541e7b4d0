"""Image files: which ones a folder holds, and whether each can be used. Decoded with PIL, in threads.

An image is a file (a `Path`) or a member of a tar shard (a `TarMember`, as webdataset and img2dataset
write them), read in place: its bytes come from the tar, nothing is unpacked to disk. `image_key` is
the one name of either, `file_problem` checks either, `image_source` opens either for PIL.

vicap's image loader (`vicap/images.py`) applies the same file and size checks, so `vicap prepare`
keeps exactly the images that `vicap features` and `vicap caption` can use.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import stat
import tarfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# What a folder is searched for (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Decompression-bomb guard: PIL warns at ~89 MP and raises at twice that; vicap refuses above this.
MAX_PIXELS = 100_000_000


@dataclass(frozen=True, slots=True)
class TarMember:
    """An image stored as member `name` of the uncompressed tar file `shard`."""

    shard: Path
    name: str

    def __str__(self) -> str:
        # The convention Python uses for files inside zip archives: the archive's path, then the member.
        return f"{self.shard}/{self.name}"


ImageRef = Path | TarMember


def _resolved(path: str | os.PathLike) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: keep the name, it will fail to load and be named
        return str(Path(path).absolute())


def image_key(ref: str | os.PathLike | TarMember) -> str:
    """The one name of an image: its absolute path with links resolved, or for a tar member the
    shard's such path, "/", and the member's name. No file can have a member's key: its "folder" is a
    regular file. Feature-store rows and de-duplication go by this key."""
    if isinstance(ref, TarMember):
        return f"{_resolved(ref.shard)}/{ref.name}"
    return _resolved(ref)


def stat_path(ref: str | os.PathLike | TarMember) -> Path:
    """The file whose size and modification time say whether `ref` changed (a member: its shard)."""
    return ref.shard if isinstance(ref, TarMember) else Path(ref)


@dataclass(frozen=True)
class _ShardIndex:
    members: dict[str, tuple[int, int]]  # name -> (offset of its data, size)
    cut: str  # why reading the member list stopped early ("" when the shard is whole)


@functools.lru_cache(maxsize=8)  # a few shards at a time: readers go through a manifest in order
def _shard_index(shard: str, size: int, mtime_ns: int) -> _ShardIndex:
    """Where each member's bytes are, from one pass over the tar headers (stdlib `tarfile`; data
    blocks are skipped, not read). Keyed by size and mtime, so a rewritten shard is read again."""
    members: dict[str, tuple[int, int]] = {}
    cut = ""
    with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, where members can be read in place
        try:
            while (m := tar.next()) is not None:
                if m.isreg():
                    members[m.name] = (m.offset_data, m.size)
                tar.members.clear()  # the index is all that is kept
        except tarfile.ReadError as e:
            cut = str(e) or "unexpected end of data"
    return _ShardIndex(members, cut)


def shard_problem(shard: Path) -> tuple[str, str] | None:
    """Why the images of `shard` cannot be read in place (missing, compressed, not a tar) as
    (kind, reason), or None. Reads the first header only."""
    problem = file_problem(shard)
    if problem is not None:
        reason = "file not found" if problem[1] == "image file not found" else problem[1]
        return problem[0], f"tar shard {shard}: {reason}"
    try:
        with tarfile.open(shard, "r:"):  # "r:": uncompressed only, where members can be read in place
            return None
    except tarfile.ReadError as e:
        return "unreadable_image", (
            f"{shard} is not an uncompressed tar file ({e}); images are read in place, so shards "
            "must be plain .tar files, as img2dataset writes them"
        )
    except OSError as e:
        return "unreadable_image", f"cannot read tar shard {shard} ({e.strerror or e})"


def _index(shard: Path) -> _ShardIndex | tuple[str, str]:
    """The shard's member index, or (kind, reason) when it cannot be read in place."""
    try:
        st = os.stat(shard)
        return _shard_index(str(shard), st.st_size, st.st_mtime_ns)
    except (OSError, tarfile.ReadError):
        return shard_problem(shard) or ("unreadable_image", f"cannot read tar shard {shard}")


def _member(ref: TarMember) -> tuple[int, int] | tuple[str, str]:
    """(offset, size) of the member, or (kind, reason) when it cannot be read."""
    index = _index(ref.shard)
    if isinstance(index, tuple):
        return index
    if ref.name in index.members:
        return index.members[ref.name]
    cut = f" (the shard is cut short: {index.cut})" if index.cut else ""
    return "missing_image", f"no member {ref.name!r} in tar shard {ref.shard}{cut}"


def image_source(ref: str | os.PathLike | TarMember) -> Path | io.BytesIO:
    """What PIL opens for `ref`: the file's path, or the member's bytes read from its shard. Call it
    after `file_problem(ref)` found nothing; a member whose bytes the shard cuts short raises OSError."""
    if not isinstance(ref, TarMember):
        return Path(ref)
    where = _member(ref)
    if isinstance(where[0], str):
        raise OSError(where[1])
    offset, size = where
    with open(ref.shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise OSError(f"image file is truncated: the shard ends {size - len(data)} bytes into this member")
    return io.BytesIO(data)


def _stat_error(path: Path, err: OSError) -> tuple[str, str]:
    """(kind, reason) for a path that `os.stat` refused."""
    if err.errno == errno.ELOOP:
        return "symlink_loop", "symbolic link loop"
    if err.errno == errno.ENOENT:
        if os.path.islink(path):
            return "missing_image", f"broken symbolic link (to {os.readlink(path)})"
        return "missing_image", "image file not found"
    return "unreadable_image", f"cannot read ({err.strerror})"


def file_problem(path: Path | TarMember) -> tuple[str, str] | None:
    """None when `path` is a regular file (links followed), else (kind, reason) with kind in
    missing_image / symlink_loop / unreadable_image. A pipe named x.jpg would block a reader forever.
    A tar member: its shard is such a file, a tar that holds it."""
    if isinstance(path, TarMember):
        where = _member(path)
        return where if isinstance(where[0], str) else None
    try:
        st = os.stat(path)
    except OSError as err:
        return _stat_error(path, err)
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "missing_image", "a folder, not an image file"
    return "unreadable_image", "not a regular file (a pipe, socket or device)"


def pixel_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None."""
    if width * height > MAX_PIXELS:
        return f"{width}x{height} is over the {MAX_PIXELS:,}-pixel limit"
    return None


def _check_file(path: ImageRef) -> tuple[str, str] | None:
    problem = file_problem(path)
    return None if problem is None else (problem[0], f"{problem[1]} ({path})")


def check_image(path: ImageRef) -> tuple[str, str] | None:
    """None when `path` decodes fully, else (kind, message) with kind in missing_image / symlink_loop /
    unreadable_image / truncated_image / oversized_image."""
    bad = _check_file(path)
    if bad is not None:
        return bad
    try:
        with Image.open(image_source(path)) as im:
            too_big = pixel_problem(im.width, im.height)
            if too_big:
                return "oversized_image", f"{too_big} ({path})"
            # A reduced-size JPEG decode still reads the whole stream (so truncation is caught)
            # at a fraction of the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
    except Image.DecompressionBombError as err:  # PIL's own limit, far above MAX_PIXELS
        return "oversized_image", f"{err} ({path})"
    except UnidentifiedImageError:
        return "unreadable_image", f"not an image PIL can read: {path}"
    except OSError as err:
        kind = "truncated_image" if "truncated" in str(err).lower() else "unreadable_image"
        return kind, f"{err} ({path})"
    except Exception as err:  # PIL raises assorted errors on corrupt data (ValueError, SyntaxError ...)
        return "unreadable_image", f"{type(err).__name__}: {err} ({path})"
    return None


def check_images(
    paths: Sequence[ImageRef], workers: int = 8, decode: bool = True
) -> dict[ImageRef, tuple[str, str]]:
    """Check many images; returns only the bad ones. `decode=False` checks the files only."""
    if not decode:
        return {p: bad for p in paths if (bad := _check_file(p)) is not None}
    bad: dict[Path, tuple[str, str]] = {}
    # PIL releases the GIL while decoding, so threads give a real speed-up. Its size warning is noise
    # (over-limit images are refused by name); filters are process-wide, so set once around the pool.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = pool.map(check_image, paths)
        bar = tqdm(
            results, total=len(paths), desc="checking images", unit="img", disable=len(paths) < 200 or None
        )
        for path, res in zip(paths, bar, strict=True):
            if res is not None:
                bad[path] = res
    return bad


@dataclass
class FolderScan:
    """What `walk_images` found: image files, sorted, and what it could not walk as (kind, path, reason)."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, Path, str]] = field(default_factory=list)


def walk_images(root: str | os.PathLike) -> FolderScan:
    """The image files under `root`: recursive, by suffix (case-insensitive), sorted.

    Entries whose name starts with "." are left out (macOS "._x.jpg" AppleDouble files are not
    images, .git is not data). Symbolic links are followed and each folder is walked once. What
    cannot be walked is returned by name, never dropped: a folder that cannot be listed
    (unreadable_folder), a link that loops or leads back into a folder above it (symlink_loop), and
    image-named entries that are broken links or not regular files (missing_image, unreadable_image).
    """
    root = Path(root)
    scan = FolderScan()
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}
    stack: list[tuple[Path, frozenset]] = [(root, frozenset(seen))]  # (folder, its ancestors and itself)
    while stack:
        folder, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            reason = f"cannot list this folder ({err.strerror}); the images in it were not read"
            scan.skipped.append(("unreadable_folder", folder, reason))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            is_image = path.suffix.lower() in IMAGE_SUFFIXES
            try:
                st = entry.stat()  # follows symbolic links
            except OSError as err:
                kind, reason = _stat_error(path, err)
                if kind == "unreadable_image" and not is_image:
                    kind = "unreadable_folder"  # cannot tell what it is; it may hold images
                # a broken link to a non-image is not data; anything else may be (a loop may be a folder)
                if is_image or kind != "missing_image":
                    scan.skipped.append((kind, path, reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in above:
                    loop = f"symbolic link loop (leads back to {os.path.realpath(path)})"
                    scan.skipped.append(("symlink_loop", path, loop))
                elif key not in seen:  # a folder two links lead to is walked once
                    seen.add(key)
                    stack.append((path, above | {key}))
            elif is_image:
                if stat.S_ISREG(st.st_mode):
                    scan.images.append(path)
                else:
                    reason = "not a regular file (a pipe, socket or device)"
                    scan.skipped.append(("unreadable_image", path, reason))
    scan.images.sort()
    scan.skipped.sort(key=lambda s: s[1])
    return scan
