"""What every data format shares: the error type, the problem collector, box checks and the format registry.

A format is one module in this folder that calls :func:`register_format` with its ``detect`` / ``read`` /
``write`` functions; adding a format is one new file (and one import line in ``__init__``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision.registry import Registry

log = logging.getLogger("negvision.data")

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image before it counts as bad (it is clipped)
MAX_LISTED = 20  # problems listed in one error message

# kinds of bad input -> words used in summaries and the README table
KIND_WORDS = {
    "missing_image": "missing image",
    "bad_image": "unreadable image",
    "missing_annotation": "missing annotation file",
    "malformed": "malformed annotation",
    "outside": "box outside the image",
    "degenerate": "degenerate box",
    "unknown_class": "unknown class",
    "unknown_image": "annotation of an unknown image",
    "duplicate_id": "duplicate id",
    "duplicate_file": "file listed twice",
    "bad_id": "id of the wrong type",
    "missing_mask": "missing mask",
    "bad_mask": "unreadable mask",
    "mask_size": "mask of the wrong size",
    "label_conflict": "label contradicts mask",
}


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line or annotation) and the problem.

    ``kind`` says what is wrong (a key of ``KIND_WORDS``, or "dataset" for a problem with the whole set that
    ``--skip-bad`` cannot skip); ``problems`` holds every message when several were found at once.
    """

    def __init__(self, message: str, kind: str = "dataset", problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.problems = list(problems) if problems is not None else [message]


class SplitNotFoundError(DatasetError):
    """The requested split does not exist in the data set (training then runs without validation)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="dataset")


SKIP_HINT = "(--skip-bad skips bad items and lists them in skipped.txt)"


def combine_errors(errors: Sequence[tuple[str, DatasetError]]) -> DatasetError:
    """One error for the problems of several splits, given as (split, error) pairs: each split's list, the
    --skip-bad hint once."""
    if len(errors) == 1:
        return errors[0][1]
    parts = []
    for split, e in errors:
        msg = str(e).replace("\n" + SKIP_HINT, "")
        parts.append(msg if " problems in split " in msg.split("\n", 1)[0] else f"split '{split}': {msg}")
    text = "\n".join(parts)
    errors = [e for _, e in errors]
    hint = "\n" + SKIP_HINT if any(SKIP_HINT in str(e) for e in errors) else ""
    return DatasetError(text + hint, kind=errors[0].kind, problems=[m for e in errors for m in e.problems])


class Problems:
    """Collects every bad item of one split; at the end either raises one error listing them, or (skip_bad)
    keeps the list for the summary and ``skipped.txt``. Whole-set problems (kind "dataset") raise at once."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[str] = []
        self.kinds: Counter[str] = Counter()
        self._first_kind: str | None = None

    def add(self, err: DatasetError) -> None:
        """Record one problem (re-raises whole-set problems)."""
        if err.kind == "dataset":
            raise err
        self.items.append(str(err))
        self.kinds[err.kind] += 1
        self._first_kind = self._first_kind or err.kind
        if self.skip_bad:
            log.warning("skipping bad item: %s", err)

    handle = add

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, what: str) -> None:
        """Without skip_bad: one DatasetError listing the first problems of ``what`` (e.g. "split 'val' of X")."""
        if self.skip_bad or not self.items:
            return
        n = len(self.items)
        shown = "\n".join(f"  {m}" for m in self.items[:MAX_LISTED])
        more = f"\n  ... and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        head = self.items[0] if n == 1 else f"{n} problems in {what}:\n{shown}{more}"
        hint = "\n" + SKIP_HINT
        raise DatasetError(head + hint, kind=self._first_kind or "malformed", problems=self.items)

    def summary(self) -> str:
        """``3 unreadable image, 1 unknown class`` style counts."""
        return ", ".join(f"{n} {KIND_WORDS.get(k, k)}" for k, n in sorted(self.kinds.items()))


# ----------------------------------------------------------------------------------------------- records


@dataclass
class Record:
    """One image of a detection split: where it is and its boxes (xyxy pixels in the displayed orientation)."""

    path: Path
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]


@dataclass
class Loaded:
    """What a detection format's ``read`` returns."""

    classes: list[str]
    items: list[Record]
    root: Path
    bad: list[str] = field(default_factory=list)
    bad_kinds: Counter[str] = field(default_factory=Counter)


def check_box(box: Sequence[float], width: int, height: int, where: str) -> list[float]:
    """Validate one xyxy pixel box against the image size and clip it; raises DatasetError."""
    x1, y1, x2, y2 = (float(v) for v in box)
    shown = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(f"{where}: box {shown} has non-finite coordinates", kind="malformed")
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: degenerate box {shown} (width or height <= 0)", kind="degenerate")
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        wholly = x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height
        raise DatasetError(
            f"{where}: box {shown} lies {'wholly ' if wholly else ''}outside the {width}x{height} image"
            + ("" if wholly else f" (by more than {tol:g} px)"),
            kind="outside",
        )
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: degenerate box {shown} after clipping to the image", kind="degenerate")
    return [x1, y1, x2, y2]


def box_arrays(boxes: list[list[float]], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of boxes and labels as float32 [N, 4] / int64 [N] arrays."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64).reshape(-1)


def rel_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or the full path when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def read_text(path: Path, what: str = "file", kind: str = "dataset") -> str:
    """UTF-8 text of ``path`` (a BOM is dropped); DatasetError naming the file if it cannot be read or decoded."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8", kind=kind
        ) from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} ({e.strerror or e})", kind=kind) from None


# ----------------------------------------------------------------------------------------------- registry


@dataclass
class DataFormat:
    """A data-set format: ``detect(path) -> bool``, ``read(path, split, problems, images) -> Loaded`` (detection)
    or a list of defect samples, and ``write(out, split, samples, classes) -> Path`` (None if read-only)."""

    name: str
    task: str  # "detection" | "defect"
    detect: Callable[[Path], bool]
    read: Callable[..., Any]
    write: Callable[..., Path] | None = None
    layout: str = ""  # one line: what the folder looks like (used in "no data set found" messages)
    priority: int = 50  # lower is tried first by auto-detection

    def __call__(self, **_: Any) -> DataFormat:  # the Registry stores builders; a format builds itself
        return self


FORMATS: Registry[DataFormat] = Registry("data format")


def register_format(
    name: str,
    task: str,
    *,
    detect: Callable[[Path], bool],
    read: Callable[..., Any],
    write: Callable[..., Path] | None = None,
    layout: str = "",
    priority: int = 50,
) -> DataFormat:
    """Register a format with the formats registry (called once at the bottom of each format module)."""
    if task not in ("detection", "defect"):
        raise ValueError(f"format task must be 'detection' or 'defect', got '{task}'")
    fmt = DataFormat(name, task, detect, read, write, layout, priority)
    FORMATS.add(name, fmt)
    return fmt


def get_format(name: str) -> DataFormat:
    """The registered format ``name`` (RegistryError with close names otherwise)."""
    return FORMATS.create(name)


def list_formats(task: str | None = None) -> list[DataFormat]:
    """Registered formats (of one task), in auto-detection order."""
    fmts = [FORMATS.create(n) for n in FORMATS.names()]
    return sorted((f for f in fmts if task is None or f.task == task), key=lambda f: (f.priority, f.name))


def format_names(task: str, writable: bool = False) -> list[str]:
    """Names of the registered formats of ``task`` (those that can write, with ``writable``), in detection order: the
    CLI's choices (``--format``, ``--dataset-kind``) come from here, so a new format needs no CLI edit."""
    return [f.name for f in list_formats(task) if f.write is not None or not writable]


def detect_format(path: str | os.PathLike, task: str) -> DataFormat:
    """The first format of ``task`` whose ``detect`` accepts ``path``; DatasetError listing the layouts otherwise."""
    p = Path(path)
    for fmt in list_formats(task):
        try:
            if fmt.detect(p):
                return fmt
        except OSError:
            continue
    layouts = "; ".join(f.layout.replace("{split}", "SPLIT") for f in list_formats(task) if f.layout)
    raise DatasetError(f"cannot tell the layout of '{p}': no {task} data set found; expected one of: {layouts}")


def resolve_format(data: str | os.PathLike, format: str | None = None) -> DataFormat:
    """The registered format of ``data``: ``format`` when given, else the detection format auto-detected, else (for a
    folder) the defect layout; DatasetError with the detection formats' layouts when none fits."""
    p = Path(data)
    if format:
        return get_format(format)
    try:
        return detect_format(p, "detection")
    except DatasetError as e:
        if p.is_dir():
            try:
                return detect_format(p, "defect")
            except DatasetError:
                pass
        raise e from None
