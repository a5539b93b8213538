"""The validation pass every split goes through: each image fully decoded once (threads, progress bar), results
cached next to the data keyed by path, size and modification time, so the next start is instant.

The cache is ``<root>/.negvision-cache.json``; where the data folder is read-only it goes to
``$NEGVISION_CACHE_DIR`` (default ``~/.cache/negvision``)``/index/<hash of the root>.json`` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vision.io import displayed_size, exif_orientation, write_text_atomic

from .formats.base import DatasetError

log = logging.getLogger("negvision.data")

CACHE_NAME = ".negvision-cache.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageInfo:
    """Result of checking one image: displayed size and EXIF orientation, or the problem found."""

    width: int = 0
    height: int = 0
    orientation: int = 1
    kind: str = ""  # "" when fine, else "bad_image" / "missing_image"
    error: str = ""


def check_image(path: Path, full_decode: bool = True, st: os.stat_result | None = None) -> ImageInfo:
    """Open ``path`` and (``full_decode``) decode every pixel; the size is the displayed one (EXIF applied)."""
    from PIL import Image

    try:
        st = st or path.stat()
    except FileNotFoundError:
        return ImageInfo(kind="missing_image", error="image not found")
    except OSError as e:
        return ImageInfo(kind="bad_image", error=f"cannot read ({e.strerror or e})")
    if st.st_size == 0:
        return ImageInfo(kind="bad_image", error="empty file (0 bytes), not an image")
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = exif_orientation(im)
            if full_decode:
                im.load()  # raises on truncated or corrupt pixel data, which a header check misses
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError, ...
        name = type(e).__name__
        what = "not an image file" if name == "UnidentifiedImageError" else "cannot decode image"
        return ImageInfo(kind="bad_image", error=f"{what} ({name}: {e})")
    w, h = displayed_size(int(w), int(h), orientation)
    return ImageInfo(w, h, orientation)


def _cache_dir() -> Path:
    return Path(os.environ.get("NEGVISION_CACHE_DIR") or Path.home() / ".cache" / "negvision") / "index"


class ImageChecker:
    """Checks images (full decode, in threads) with a per-data-set cache; readers call :meth:`prefetch` with
    the paths they are about to use, then :meth:`size` per image."""

    def __init__(self, root: str | os.PathLike | None, *, full_decode: bool = True, progress: bool = True,
                 workers: int | None = None, use_cache: bool = True) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.full_decode = full_decode
        self.progress = progress
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.use_cache = use_cache and self.root is not None
        self._prefix = str(self.root) + os.sep if self.root is not None else ""
        self._results: dict[str, ImageInfo] = {}
        self._cache: dict[str, list] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self.checked = 0  # images decoded this time (not answered from the cache)
        self.cached = 0
        if self.use_cache:
            self._load_cache()

    # ------------------------------------------------------------------ cache
    def cache_paths(self) -> list[Path]:
        """Where the cache is read from, in order (next to the data, then the user cache folder)."""
        assert self.root is not None
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:16]
        return [self.root / CACHE_NAME, _cache_dir() / f"{digest}.json"]

    def _load_cache(self) -> None:
        for p in self.cache_paths():
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and data.get("root") == str(self.root) \
                    and data.get("full_decode", True) >= self.full_decode and isinstance(data.get("images"), dict):
                self._cache = data["images"]
                return

    def save(self) -> Path | None:
        """Write the cache if anything new was checked; next to the data, else in the user cache folder."""
        if not self.use_cache or not self._dirty:
            return None
        assert self.root is not None
        for key in [k for k in self._cache if not (self.root / k).exists()]:
            del self._cache[key]  # files removed since they were checked
        payload = json.dumps({"version": CACHE_VERSION, "root": str(self.root), "full_decode": self.full_decode,
                              "images": self._cache}, separators=(",", ":"))
        for p in self.cache_paths():
            if p.parent != self.root and not os.access(p.parent, os.W_OK):
                try:
                    p.parent.mkdir(parents=True, exist_ok=True)
                except OSError:
                    continue
            if not os.access(p.parent, os.W_OK):
                continue  # never write inside a read-only data folder
            try:
                write_text_atomic(p, payload)
            except OSError:
                continue
            self._dirty = False
            return p
        log.warning("could not write the image index cache (%s)", ", ".join(map(str, self.cache_paths())))
        return None

    def _key(self, path: Path) -> str:
        s = str(path) if path.is_absolute() else str(path.resolve())
        if self._prefix and s.startswith(self._prefix):
            return s[len(self._prefix):].replace(os.sep, "/")
        return s

    # ------------------------------------------------------------------ checking
    def _lookup(self, path: Path) -> tuple[ImageInfo | None, os.stat_result | None]:
        """(cached result or None, stat) of one path: a cache hit costs one stat and a dict lookup."""
        try:
            st = path.stat()
        except OSError:
            return None, None
        if self.use_cache:
            hit = self._cache.get(self._key(path))
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return ImageInfo(*hit[2:]), st
        return None, st

    def _decode(self, path: Path, st: os.stat_result | None) -> ImageInfo:
        info = check_image(path, self.full_decode, st)
        if st is not None and self.use_cache:
            with self._lock:
                self._cache[self._key(path)] = [st.st_size, st.st_mtime_ns, info.width, info.height,
                                                info.orientation, info.kind, info.error]
                self._dirty = True
        return info

    def _check_one(self, path: Path) -> ImageInfo:
        info, st = self._lookup(path)
        if info is not None:
            self.cached += 1
            return info
        self.checked += 1
        return self._decode(path, st)

    def prefetch(self, paths: Iterable[Path], desc: str = "checking images") -> None:
        """Check every path not checked yet: cache hits first (one stat each), then the misses decoded in
        threads, a chunk of files per task (a progress bar when there are many)."""
        todo = list(dict.fromkeys(Path(p) for p in paths if str(p) not in self._results))
        if not todo:
            return
        misses: list[tuple[Path, os.stat_result | None]] = []
        for p in todo:
            info, st = self._lookup(p)
            if info is not None:
                self._results[str(p)] = info
                self.cached += 1
            else:
                misses.append((p, st))
        if not misses:
            return
        from vision.progress import progress_bar

        bar = progress_bar(len(misses), desc=desc, unit="img", leave=False,
                           enabled=self.progress and len(misses) >= 200)

        def run(chunk: list[tuple[Path, os.stat_result | None]]) -> list[ImageInfo]:
            out = [self._decode(p, st) for p, st in chunk]
            bar.update(len(chunk))
            return out

        size = max(16, min(512, len(misses) // (self.workers * 8) or 16))
        chunks = [misses[i:i + size] for i in range(0, len(misses), size)]
        try:
            if len(chunks) == 1 or self.workers <= 1:
                results = [run(c) for c in chunks]
            else:
                with ThreadPoolExecutor(self.workers) as pool:
                    results = list(pool.map(run, chunks))
        finally:
            bar.close()
        for chunk, infos in zip(chunks, results, strict=True):
            for (p, _), info in zip(chunk, infos, strict=True):
                self._results[str(p)] = info
        self.checked += len(misses)
        self.save()

    def info(self, path: Path) -> ImageInfo:
        """The check result of ``path`` (checked now if it was not prefetched)."""
        key = str(path)
        if key not in self._results:
            self._results[key] = self._check_one(Path(path))
        return self._results[key]

    def size(self, path: Path, ref: str | None = None) -> tuple[int, int]:
        """Displayed (width, height) of a good image; DatasetError naming the file (and ``ref``) otherwise."""
        info = self.info(path)
        if info.kind:
            by = f" (referenced by {ref})" if ref and info.kind == "missing_image" else ""
            raise DatasetError(f"{path}: {info.error}{by}", kind=info.kind)
        return info.width, info.height
