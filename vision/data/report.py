"""``negvision data report``: load every split of a data folder through the formats registry, run every registered
report section (``vision``'s own in :mod:`vision.data.report_basic`, plus those of the packages above it), and write
``report.json`` (every figure) and one self-contained ``report.html`` (pictures inline, no network)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vision.io import error_line, write_json_atomic, write_text_atomic

from . import report_basic  # noqa: F401  (registers vision's own sections)
from .formats import DataFormat, DatasetError, SplitNotFoundError, combine_errors, resolve_format
from .report_basic import NEAR_THRESHOLD, image_hashes
from .report_html import esc, page, problem_list
from .report_sections import ReportContext, ReportSection, load_external_sections, report_sections

log = logging.getLogger("negvision.data")

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


class ReportWriteError(OSError):
    """The report folder cannot be created or written (the message is one line naming it)."""


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it before any slow work; ReportWriteError in one line otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".report-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ReportWriteError(f"cannot write the report folder '{out}' ({e.strerror or type(e).__name__})") from None


def load_splits(data: Path, fmt: DataFormat, splits: list[str] | None = None, *, skip_bad: bool = False,
                progress: bool = True, cache: bool = True) -> dict[str, Any]:
    """Every split of ``data`` that exists (or the named ``splits``, each of which must exist), loaded and validated as
    training loads them: detection datasets, or checked defect splits. Bad items of every split raise one
    DatasetError (or are dropped with ``skip_bad``)."""
    from .defect_split import DEFECT_SPLITS, check_defect_split
    from .detection import DETECTION_SPLITS, load_detection_dataset

    names = list(splits) if splits else list(DETECTION_SPLITS if fmt.task == "detection" else DEFECT_SPLITS)
    loaded: dict[str, Any] = {}
    errors: list[tuple[str, DatasetError]] = []
    for s in names:
        try:
            if fmt.task == "detection":
                loaded[s] = load_detection_dataset(data, s, skip_bad=skip_bad, format=fmt.name, progress=progress,
                                                   cache=cache)
            else:
                loaded[s] = check_defect_split(data, s, fmt.name, skip_bad=skip_bad, progress=progress, cache=cache)
        except SplitNotFoundError as e:
            if splits:
                errors.append((s, e))
        except DatasetError as e:
            errors.append((s, e))
        except ValueError as e:  # a split name the layout does not have
            errors.append((s, DatasetError(str(e))))
    if errors:
        raise combine_errors(errors)
    if not loaded:
        raise DatasetError(f"{data}: no split of {', '.join(names)} found ({fmt.name} format)")
    return loaded


def _run_section(name: str, fn: Any, ctx: ReportContext) -> tuple[ReportSection | None, str]:
    """(section, error): a section that fails is left out with its error, the others still run."""
    try:
        return fn(ctx), ""
    except Exception as e:  # a broken section (another package's) must not lose the whole report
        log.warning("report section %s failed: %s", name, error_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
        return None, f"section {name} failed: {error_line(e)}"


def _headline(ctx: ReportContext, sections: dict[str, ReportSection]) -> dict[str, Any]:
    """The numbers the command prints and the page shows first: splits, images, boxes, leakage, problems."""
    splits = {}
    for s, ds in ctx.splits.items():
        if hasattr(ds, "annotations"):
            splits[s] = {"images": len(ds), "boxes": int(sum(len(ds.annotations(i)[1]) for i in range(len(ds))))}
        else:
            splits[s] = {"images": len(ds.samples), "defective": sum(1 for x in ds.samples if x.label == 1)}
    dup = sections.get("duplicates")
    across = {"exact": 0, "near": 0, "images": 0}
    if dup is not None:
        f = dup.figures
        across = {"exact": f["exact"]["across_groups"], "near": f["near"]["across_pairs"], "images": f["images_leaked"]}
    return {"splits": splits, "duplicates_across_splits": across,
            "problems": {n: len(s.problems) for n, s in sections.items()},
            "severe": sorted(n for n, s in sections.items() if s.severe)}


def _headline_html(ctx: ReportContext, head: dict[str, Any], sections: dict[str, ReportSection]) -> str:
    parts = []
    for s, v in head["splits"].items():
        extra = f", {v['boxes']:,} boxes" if "boxes" in v else f", {v['defective']:,} defective"
        parts.append(f"<b>{esc(s)}</b> {v['images']:,} images{extra}")
    a = head["duplicates_across_splits"]
    severe = bool(head["severe"])
    leak = (f'<span class="{"severe-tag" if a["exact"] or a["near"] else "ok-tag"}">{a["exact"]} exact and '
            f'{a["near"]} near duplicates across splits</span> ({a["images"]} images)')
    probs = ", ".join(f"{esc(sections[n].title)}: {k}" for n, k in head["problems"].items() if k) or "none"
    sev = (f'<p class="severe-tag">severe: {esc(", ".join(sections[n].title for n in head["severe"]))} '
           "(--strict exits 1)</p>" if severe else "")
    return (f'<div class="headline{" severe" if severe else ""}"><p>{esc(ctx.data)} &middot; format '
            f"<b>{esc(ctx.format)}</b> &middot; at --img-size {ctx.img_size}</p><p>{' &middot; '.join(parts)}</p>"
            f"<p>{leak}</p><p>problems per section: {probs}</p>{sev}</div>")


def make_report(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    img_size: int = 640,
    splits: list[str] | None = None,
    near_threshold: int = NEAR_THRESHOLD,
    skip_bad: bool = False,
    strict: bool = False,
    progress: bool = True,
    cache: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out/report.json`` and ``out/report.html`` for the data folder ``data``; returns the summary dict.

    Args:
        data: a detection data set (any format of the registry) or a defect layout.
        out: the report folder (created; written atomically).
        format: the registry's format name (default: auto-detected).
        img_size: the training resolution (longer side after letterboxing) box figures are given at.
        splits: the splits to report (default: every split that exists).
        near_threshold: perceptual-hash Hamming distance (of 64 bits) at or below which two images are near copies.
        skip_bad: drop unreadable images and bad boxes (listed in the report) instead of stopping at them.
        strict: recorded in the summary: ``strict_failed`` is True when a section is severe (the CLI exits 1).
        progress: progress bars while validating and hashing.
        cache: use the validation cache next to the data.
        options: further section options by name (``overlap_iou``, ``tiny_px``, ``rare_boxes``, ``slice`` ...).

    Returns:
        ``{"report_html", "report_json", "headline", "sections": {name: problems}, "severe", "strict_failed",
        "timings": {"load", "hashing", "sections", "write"}, "section_seconds": {name: s}, "notes"}``.

    Raises:
        DatasetError: the data cannot be read (names the file and line), as ``data check``.
        ReportWriteError: the report folder cannot be written (checked before the data is read).
    """
    data, out = Path(data).expanduser(), Path(out).expanduser()
    if not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    _check_writable(out)
    fmt = resolve_format(data, format)
    t0 = time.perf_counter()
    loaded = load_splits(data, fmt, splits, skip_bad=skip_bad, progress=progress, cache=cache)
    timings = {"load": time.perf_counter() - t0}
    opts = {"near_threshold": near_threshold, "skip_bad": skip_bad, "progress": progress, **(options or {})}
    ctx = ReportContext(data=data, format=fmt.name, splits=loaded, img_size=int(img_size), out=out, options=opts)
    t0 = time.perf_counter()
    image_hashes(ctx, progress=progress)
    timings["hashing"] = time.perf_counter() - t0
    notes = load_external_sections()
    t0 = time.perf_counter()
    sections: dict[str, ReportSection] = {}
    per_section: dict[str, float] = {}
    for name, fn in report_sections():
        t1 = time.perf_counter()
        sec, err = _run_section(name, fn, ctx)
        per_section[name] = round(time.perf_counter() - t1, 3)
        if err:
            notes.append(err)
        if sec is not None:
            sections[name] = sec
    timings["sections"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = _headline(ctx, sections)
    severe = bool(head["severe"])
    skipped = {s: list(getattr(ds, "bad", [])) for s, ds in loaded.items()}
    doc = {
        "data": str(data), "format": fmt.name, "task": fmt.task, "img_size": ctx.img_size,
        "options": {k: v for k, v in opts.items() if k != "progress"}, "headline": head, "skipped": skipped,
        "sections": {n: {"title": s.title, "severe": s.severe, "problems": s.problems, "figures": s.figures}
                     for n, s in sections.items()},
        "notes": notes, "timings_s": {k: round(v, 3) for k, v in timings.items()}, "section_seconds": per_section,
    }
    blocks = [(n, s.title + (" (severe)" if s.severe else ""), s.html) for n, s in sections.items()]
    if any(skipped.values()):
        lines = [f"[{s}] {m}" for s, items in skipped.items() for m in items]
        blocks.append(("skipped", "Skipped by --skip-bad", problem_list(lines, limit=200)))
    html = page(f"Data report: {data.name or data}", _headline_html(ctx, head, sections), blocks, notes)
    try:
        write_json_atomic(out / REPORT_JSON, doc)
        write_text_atomic(out / REPORT_HTML, html)
    except OSError as e:
        raise ReportWriteError(f"cannot write the report into '{out}' ({e.strerror or type(e).__name__})") from None
    timings["write"] = time.perf_counter() - t0
    doc_timings = {k: round(v, 3) for k, v in timings.items()}
    return {"report_html": out / REPORT_HTML, "report_json": out / REPORT_JSON, "format": fmt.name,
            "headline": head, "sections": {n: s.problems for n, s in sections.items()},
            "titles": {n: s.title for n, s in sections.items()}, "severe": severe,
            "strict_failed": bool(strict and severe), "timings": doc_timings, "section_seconds": per_section,
            "notes": notes}
