"""Weights files on disk: check, read and stream safetensors and torch files (``weights_only=True``).

One safetensors header parser (:func:`read_safetensors_header`), one dtype table (:data:`SAFETENSORS_DTYPES`),
the per-tensor memory-mapped :class:`SafetensorsReader` / :class:`SafetensorsWriter`, and every damaged file
reported as one-line :class:`CheckpointCorruptError` naming it. (Finding known weights by name, and downloading
them, is :mod:`vision.weights`.)
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vision.io import error_line

__all__ = [
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_MAX_HEADER",
    "CheckpointCorruptError",
    "SafetensorsHeader",
    "SafetensorsReader",
    "SafetensorsWriter",
    "check_safetensors_structure",
    "check_torch_zip",
    "check_weights_file",
    "dtype_size",
    "is_access_error",
    "read_safetensors",
    "read_safetensors_header",
    "read_torch_file",
    "read_weights_file",
    "torch_dtype",
]

SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the limit safetensors itself enforces

# safetensors dtype name -> (name of the torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}  # fmt: skip


class CheckpointCorruptError(ValueError):
    """A checkpoint file is truncated, altered or unreadable: ``"{path}: damaged checkpoint file ({reason})"``.

    ``path`` is the damaged file, ``reason`` says what is wrong. ``message`` replaces the default text (used to
    list every checkpoint a resume tried); its first line still names the damaged file.
    """

    def __init__(self, path: str | os.PathLike, reason: str, *, message: str | None = None):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(
            message if message is not None else f"{self.path}: damaged checkpoint file ({self.reason})"
        )


def is_access_error(err: BaseException) -> bool:
    """An error about reaching the file (permissions, gone, I/O), not about its contents."""
    return isinstance(err, OSError) and err.errno in (
        errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.EIO, errno.ENOTDIR,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- dtypes


def dtype_size(name: str) -> int:
    """Bytes per element of safetensors dtype ``name``; ``ValueError`` for a dtype not in the table."""
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return SAFETENSORS_DTYPES[name][1]


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of safetensors dtype ``name``; None when the table or this torch lacks it."""
    attr = SAFETENSORS_DTYPES.get(name, ("", 0))[0]
    dtype = getattr(torch, attr, None) if attr else None
    return dtype if isinstance(dtype, torch.dtype) else None


# ----------------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a .safetensors file: tensor entries, ``__metadata__`` and where the data lies."""

    entries: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # 8 + header length: offset of the data in the file
    data_end: int  # bytes of data the entries describe
    size: int  # bytes of the file


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse the header of a .safetensors file (length, JSON object, each entry's offsets against its shape and
    dtype); :class:`CheckpointCorruptError` naming the file otherwise. The data itself is not read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointCorruptError(path, f"not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len == 0 or header_len > SAFETENSORS_MAX_HEADER:
            raise CheckpointCorruptError(path, f"not a safetensors file (bad header size {header_len})")
        if 8 + header_len > size:
            raise CheckpointCorruptError(
                path, f"truncated safetensors: header says {header_len} bytes of header, file has {size - 8}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointCorruptError(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointCorruptError(path, "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointCorruptError(path, f"not a safetensors file (bad entry for tensor '{name}')")
        shape, dtype = info.get("shape"), str(info.get("dtype"))
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape) and dtype in SAFETENSORS_DTYPES:
            if math.prod(shape) * dtype_size(dtype) != offsets[1] - offsets[0]:
                raise CheckpointCorruptError(
                    path, f"damaged safetensors header: tensor '{name}' of shape {shape} spans {offsets}"
                )
        data_end = max(data_end, offsets[1])
    return SafetensorsHeader(header, metadata, 8 + header_len, data_end, size)


def check_safetensors_structure(path: str | os.PathLike) -> None:
    """Cheap structural check of a .safetensors file (header length, JSON header, data size).

    Raises :class:`CheckpointCorruptError` on a truncated / overlong file or one that is not safetensors.
    """
    h = read_safetensors_header(path)
    have = h.size - h.data_start
    if have < h.data_end:
        raise CheckpointCorruptError(
            path, f"truncated safetensors: header says {h.data_end} bytes of data, file has {have}"
        )
    if have > h.data_end:
        raise CheckpointCorruptError(
            path, f"safetensors file has {have - h.data_end} bytes more data than its header says"
        )


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (on the CPU), after :func:`check_safetensors_structure`."""
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors_structure(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends: the file's contents are broken
        if is_access_error(e):
            raise
        raise CheckpointCorruptError(path, f"cannot read safetensors ({error_line(e)})") from None


class SafetensorsReader:
    """Reads one tensor at a time from a .safetensors file through a memory map of just that tensor's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        h = read_safetensors_header(self.path)
        self.data_start = h.data_start
        self.metadata: dict[str, str] = h.metadata
        self.entries: dict[str, dict] = h.entries
        need = h.data_start + h.data_end
        if h.size < need:  # a cut-off copy or download: reading a tensor past the end would fail (or SIGBUS)
            reason = f"cut short: {h.size} bytes, its header describes {need}"
            raise CheckpointCorruptError(
                self.path, reason, message=f"'{self.path}' is {reason}; copy or download it again"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        """A private copy of tensor ``key`` (the map is closed before returning)."""
        e = self.entries[key]
        begin, end = e["data_offsets"]
        dtype = torch_dtype(e["dtype"])
        if dtype is None:
            raise ValueError(f"'{self.path}': tensor '{key}' has unsupported dtype {e['dtype']}")
        nbytes = end - begin
        if nbytes == 0:
            return torch.empty(e["shape"], dtype=dtype)
        start = self.data_start + begin
        page = start - start % mmap.ALLOCATIONGRANULARITY
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f, mmap.mmap(
            f.fileno(), start - page + nbytes, offset=page, access=mmap.ACCESS_READ
        ) as m:
            view = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=start - page)
            out.numpy()[:] = view  # the only copy: mapped file bytes -> tensor
            del view  # release the buffer before the map closes
        return out.view(dtype).reshape(e["shape"])


class SafetensorsWriter:
    """Fills a safetensors file whose layout (names, dtypes, shapes) is fixed up front, one tensor at a time.

    ``f`` is a binary file open for reading and writing (from :func:`vision.io.atomic_writer`, which fsyncs and
    renames it into place); each tensor goes straight into a memory map of its byte range.
    """

    def __init__(self, f: IO[bytes], layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, dt, shape in layout:
            size = math.prod(shape) * dtype_size(dt)
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + size]}
            self.offsets[name] = (off, off + size)
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + off
        self.f = f
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(self.total)  # flushes the header, then sizes the file for the maps

    def write(self, name: str, t: torch.Tensor) -> None:
        begin, end = self.offsets[name]
        if end == begin:
            return
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != end - begin:
            raise RuntimeError(f"internal: tensor '{name}' has {data.numel()} bytes, expected {end - begin}")
        start = self.data_start + begin
        page = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(self.f.fileno(), start - page + (end - begin), offset=page) as m:
            view = np.frombuffer(m, dtype=np.uint8, count=end - begin, offset=start - page)
            view[:] = data.numpy()
            del view
            m.flush()


# ----------------------------------------------------------------------------------------------- torch files


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def check_torch_zip(path: str | os.PathLike, *, crc: bool = True) -> None:
    """Structural check of a ``torch.save`` / TorchScript file: a zip archive whose directory reads (it sits at the
    end: a cut-off download has none) and, with ``crc``, whose members pass their CRC check."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointCorruptError(path, "empty file")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if crc else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointCorruptError(path, f"broken zip archive, truncated? ({error_line(e)})") from None
    if bad is not None:
        raise CheckpointCorruptError(path, f"zip member '{bad}' fails its CRC check")


def read_torch_file(path: str | os.PathLike, what: str = "weights", *, memory_map: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, memory-mapped with ``memory_map`` where the format allows. A
    damaged file is a one-line :class:`CheckpointCorruptError` (``what`` says what the file holds); an intact one
    holding objects ``weights_only`` refuses is a ``ValueError`` saying so."""
    path = Path(path)
    try:
        if memory_map:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a truncated archive as OSError(EINVAL), among others
        if is_access_error(e):
            raise
        err = e
    if path.stat().st_size and not _starts_like_zip(path):
        raise CheckpointCorruptError(
            path,
            f"cannot unpickle {what}: it is not a readable torch checkpoint, neither a torch zip archive nor a "
            f"legacy torch pickle ({error_line(err)})",
        )
    try:
        check_torch_zip(path)
    except CheckpointCorruptError as e:
        raise CheckpointCorruptError(path, f"cannot unpickle {what} ({e.reason})") from None
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
        # an intact archive holding objects weights_only refuses (e.g. a whole pickled model): not damage
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next(
            (ln for ln in lines if "WeightsUnpickler error" in ln or "Unsupported" in ln), lines[-1]
        )
        raise ValueError(
            f"{path}: cannot load {what} with weights_only=True: it holds Python objects other than tensors and "
            f"plain containers ({detail[:200]}); save a state_dict instead"
        ) from None
    raise CheckpointCorruptError(path, f"cannot unpickle {what} ({error_line(err)})")


# ----------------------------------------------------------------------------------------------- any weights file


def check_weights_file(path: str | os.PathLike) -> None:
    """Cheap check, before a library loads it, that a weights file is whole: a .safetensors header and size, or
    the zip directory of a ``torch.save`` / TorchScript file (read from its end: a cut-off download has none).
    Other files (old pickles, .npz) pass. :class:`CheckpointCorruptError` naming the file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors_structure(path)
    elif path.stat().st_size == 0 or _starts_like_zip(path):
        check_torch_zip(path, crc=False)


def read_weights_file(path: str | os.PathLike) -> Any:
    """What a weights file holds: the tensors of a .safetensors file (:func:`read_safetensors`), else the object of
    a torch file (:func:`read_torch_file`); damage raises :class:`CheckpointCorruptError` naming the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path)
