"""Image sources for OOD scoring: folders (ImageNet-style class folders too) and OpenOOD-style image lists."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from vision import io as vio

# the project's image extensions plus the formats OOD benchmark sets also ship (GIF, PPM, JFIF)
IMAGE_EXTENSIONS: tuple[str, ...] = (*vio.IMAGE_EXTENSIONS, ".gif", ".ppm", ".jfif")
IMAGE_EXTS = IMAGE_EXTENSIONS  # old name


class BadImageError(vio.ImageReadError):
    """An image file that cannot be decoded; the message names the file."""


def list_images(source: str | Path, data_root: str | Path | None = None) -> list[Path]:
    """All images under a folder (recursive, sorted), or the paths of an image list file
    (:func:`vision.io.read_image_list`: absolute paths or paths relative to ``data_root`` (default: the list's folder),
    spaces allowed, an optional label column as OpenOOD writes it)."""
    source = Path(source)
    if source.is_dir():
        try:
            return vio.list_images(source, extensions=IMAGE_EXTENSIONS)
        except FileNotFoundError:  # no images: an empty source, which the caller reports by its set name
            return []
    if source.is_file():
        return [e.path for e in vio.read_image_list(source, data_root)]
    raise FileNotFoundError(f"image source {source} is neither a folder nor a list file")


def class_folders(root: str | Path) -> list[str]:
    """Sub-folder names of an ImageNet-style folder (sorted), used as ID class names when none are given."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def load_image(path: str | Path):
    """Fully decode an image as RGB in its displayed orientation (EXIF); BadImageError naming the file otherwise."""
    try:
        return vio.open_image(path, "RGB")
    except vio.ImageReadError as e:
        raise BadImageError(str(e)) from e


def iter_batches(paths: Sequence[Path], batch_size: int, skip_bad: bool = False) -> Iterator[tuple[list[Path], list]]:
    """Yield (paths, PIL images) batches; bad files raise, or are skipped with a warning under ``skip_bad``."""
    bp: list[Path] = []
    bi: list = []
    for p in paths:
        try:
            im = load_image(p)
        except BadImageError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipped: {e}", stacklevel=2)
            continue
        bp.append(Path(p))
        bi.append(im)
        if len(bp) == batch_size:
            yield bp, bi
            bp, bi = [], []
    if bp:
        yield bp, bi
