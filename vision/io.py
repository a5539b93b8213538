"""Files: atomic writes (temp file + fsync + rename, umask honoured), images read in their displayed orientation
(EXIF), image listing and collision-free output names. Shared by every package."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # EXIF tag: 1 upright; 5-8 swap width and height when displayed

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it for more than an instant)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would (0666 / 0777 less the umask).

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries; a renamed temp file would otherwise keep that
    mode and nobody else on a shared machine could read a run.
    """
    is_dir = os.path.isdir(path) if directory is None else directory
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the umask's mode (for directories renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    apply_umask(tmp, directory=True)
    return tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success fsync and rename it onto ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (symlinks skipped)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(dirpath)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the complete folder ``tmp`` onto ``dst``; an existing ``dst`` (folder or file) is moved aside first
    and deleted once the new one is in place (restored if the rename fails)."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f"{tmp.name}.old")
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
    """``json.dump``'s ``default``: numpy / torch values as lists, paths as strings, sets and tuples as lists."""
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, os.PathLike):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def error_line(err: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it): a library's error inside a
    one-line message of ours."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def read_json(path: str | os.PathLike, problem: str = "not valid JSON") -> Any:
    """The parsed JSON of a UTF-8 file; ``ValueError("{path}: {problem} ({cause})")`` when it cannot be read,
    decoded or parsed (a file cut short, edited by hand, not JSON)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: {problem} ({e})") from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (numpy/torch values and paths converted)."""
    with atomic_writer(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=json_default)


def list_image_files(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden folders skipped), sorted by path; fast on large folders."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1].lower() in extensions)
    return [Path(f) for f in sorted(out)]


@dataclass(frozen=True)
class ListEntry:
    """One line of an image list: the image's path, its label column (None without one) and the line number."""

    path: Path
    label: str | None
    line: int


def _split_label(entry: str) -> tuple[str, str | None]:
    """``path<TAB>label`` (the unambiguous form), or OpenOOD's ``path label`` when the last space-separated token is
    an integer after a path with a file extension; else the whole entry is the path (spaces included)."""
    if "\t" in entry:
        path, _, label = entry.partition("\t")
        return path.strip(), label.strip() or None
    head, _, tail = entry.rpartition(" ")
    if head and tail.lstrip("-").isdigit() and Path(head.strip()).suffix:
        return head.strip(), tail
    return entry, None


def read_image_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[ListEntry]:
    """The entries of an image list file, the one list reader of every command that takes one.

    One image a line: an absolute path, or a path relative to ``root`` (default: the list's folder); paths may hold
    spaces. An optional label follows a TAB (``path<TAB>label``), or, as OpenOOD image lists write it, a space and an
    integer after a path with an image extension (``class/0001.png 3``). Blank lines and ``#`` comments are skipped; a
    BOM and CRLF line ends are fine. A listed file that is missing is kept (reading it names it); a line with a label
    but no path, or a list that is not UTF-8 text, raises ``ValueError`` naming the file and line."""
    src = Path(list_file)
    base = Path(root) if root is not None else src.parent
    try:
        lines = src.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: image list is not UTF-8 text (byte {e.start}: {e.reason})") from None
    out: list[ListEntry] = []
    for lineno, line in enumerate(lines, 1):
        entry = line.strip(" \r\n")  # a leading TAB is kept: it means a label without a path
        if not entry.strip() or entry.startswith("#"):
            continue
        path, label = _split_label(entry)
        if not path:
            raise ValueError(f"{src}:{lineno}: no image path before the label {label!r}")
        p = Path(path).expanduser()
        out.append(ListEntry(p if p.is_absolute() else base / p, label, lineno))
    return out


def list_images(source: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files of a folder (recursive, sorted), the single image given, or the paths of a ``.txt`` list
    (:func:`read_image_list`: absolute or relative to the list's folder, as ultralytics ``source=list.txt``). A listed
    file that is missing is kept: reading it gives the error naming it (or is skipped with --skip-bad). Clear errors
    otherwise."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".txt":
        out = [e.path for e in read_image_list(src)]
        if not out:
            raise FileNotFoundError(f"image list '{src}' names no image")
        return out
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"source '{src}' is neither an image file nor a folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(extensions)}) under '{src}'")
    return files


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def exif_orientation(im: Any) -> int:
    """The EXIF orientation tag of an open PIL image (1 when absent or unreadable)."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # broken EXIF blocks are common in phone exports: treat as upright
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) as shown: EXIF orientations 5-8 rotate by 90 degrees."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def open_image(path: str | os.PathLike, mode: str | None = "RGB") -> Any:
    """Fully decode ``path`` as a PIL image in its displayed orientation (EXIF applied), converted to ``mode``.

    Raises :class:`ImageReadError` naming the file for missing, non-image, zero-byte or truncated files.
    """
    from PIL import Image, ImageOps

    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            out = ImageOps.exif_transpose(im)  # returns a copy (or the image itself when upright)
            if mode is not None and out.mode != mode:
                out = out.convert(mode)
            elif out is im:
                out = im.copy()
    except FileNotFoundError:
        raise ImageReadError(f"{p}: image file not found") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError...
        if p.is_file() and p.stat().st_size == 0:
            raise ImageReadError(f"{p}: empty file (0 bytes), not an image") from None
        raise ImageReadError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None
    return out


def open_image_or_skip(path: str | os.PathLike, mode: str, skip_bad: bool, skipped: list[str]) -> Any | None:
    """``open_image``; an unreadable file raises ValueError naming it, or with ``skip_bad`` is logged, added to
    ``skipped`` and gives None (the ``predict`` commands' policy)."""
    try:
        return open_image(path, mode)
    except ImageReadError as e:
        if not skip_bad:
            raise ValueError(str(e)) from None
        import logging

        logging.getLogger("negvision").warning("skipping %s", e)
        skipped.append(str(e))
        return None


def output_names(files: list[Path], source: str | os.PathLike | None = None) -> list[Path]:
    """Relative output stems for ``files`` that never collide: sub-folders of ``source`` are mirrored, and
    files sharing a stem in one folder keep their extension (``a.jpg`` / ``a.png`` -> ``a.jpg`` / ``a.png``
    stems, so outputs become ``a.jpg.json`` / ``a.png.json``; a lone ``a.jpg`` gives ``a``)."""
    root = Path(source) if source is not None and Path(source).is_dir() else None
    rels: list[Path] = []
    for f in files:
        rel: Path | None = None
        if root is not None:
            with contextlib.suppress(ValueError):
                rel = Path(f).resolve().relative_to(root.resolve())
        rels.append(rel if rel is not None else Path(Path(f).name))
    if root is None:  # a list of files from anywhere: the same name in two folders keeps its folder's name
        count: dict[str, int] = {}
        for r in rels:
            count[r.name] = count.get(r.name, 0) + 1
        rels = [Path(Path(f).parent.name or "_") / r.name if count[r.name] > 1 else r
                for f, r in zip(files, rels, strict=True)]
    stems: dict[Path, int] = {}
    for r in rels:
        key = r.with_suffix("")
        stems[key] = stems.get(key, 0) + 1
    out = [r if stems[r.with_suffix("")] > 1 else r.with_suffix("") for r in rels]
    # last resort (e.g. the same file given twice): number the repeats
    taken: dict[Path, int] = {}
    final = []
    for o in out:
        n = taken.get(o, 0)
        taken[o] = n + 1
        final.append(o if n == 0 else o.with_name(f"{o.name}_{n + 1}"))
    return final
