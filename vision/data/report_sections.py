"""The sections of ``negvision data report``: one registry, filled by ``vision`` (counts, boxes, duplicates) and by
the packages above it (``detectors.atss.report``: what the ATSS assigner does with the boxes).

A section is a function ``section(ctx: ReportContext) -> ReportSection | None`` registered with
``@register_section("name", order=N)``; ``None`` means "does not apply to this data" (e.g. a defect layout has no
boxes). Packages above ``vision`` are named in :data:`EXTERNAL_SECTION_MODULES` and imported when a report is made
(``vision`` never imports them at module level); one that cannot be imported is left out with a note.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ReportContext:
    """What every section reads.

    Attributes:
        data: the data folder (or file) given to ``--data``.
        format: the detection format name of the registry, or a defect layout name.
        splits: split name -> loaded dataset (``vision.data.DetectionDataset`` for detection formats, a defect
            dataset for defect layouts); the splits that exist.
        img_size: the training resolution (the longer side after letterboxing) figures are drawn at.
        out: the report folder (sections may write extra files there; pictures go inline in ``html``).
        options: the command's other options (thresholds, ``--slice`` ...), by name.
        cache: a dict shared by the sections of one report (e.g. image hashes computed once).
    """

    data: Path
    format: str
    splits: dict[str, Any]
    img_size: int
    out: Path
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportSection:
    """One section of the report: ``figures`` (JSON-able, the section's entry in ``report.json``), ``html`` (a
    fragment of the self-contained page; pictures as ``data:`` URIs), and ``problems`` (one line per finding a user
    should act on; ``--strict`` exits 1 when a section marks one ``severe``)."""

    title: str
    figures: dict[str, Any]
    html: str
    problems: list[str] = field(default_factory=list)
    severe: bool = False


SectionFn = Callable[[ReportContext], "ReportSection | None"]

# name -> (order, function); sections are rendered by ascending order
_SECTIONS: dict[str, tuple[int, SectionFn]] = {}

# modules of the packages above vision that register sections when imported
EXTERNAL_SECTION_MODULES: tuple[str, ...] = ("detectors.atss.report", "detectors.label_issues")


def register_section(name: str, order: int = 100) -> Callable[[SectionFn], SectionFn]:
    """Register ``fn`` as report section ``name`` (rendered by ascending ``order``)."""

    def deco(fn: SectionFn) -> SectionFn:
        if name in _SECTIONS and _SECTIONS[name][1] is not fn:
            raise ValueError(f"report section {name!r} is already registered")
        _SECTIONS[name] = (order, fn)
        return fn

    return deco


def load_external_sections() -> list[str]:
    """Import :data:`EXTERNAL_SECTION_MODULES`; returns a note per module that could not be imported."""
    notes = []
    for mod in EXTERNAL_SECTION_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            notes.append(f"{mod}: not available ({e})")
    return notes


def report_sections() -> list[tuple[str, SectionFn]]:
    """The registered sections, in render order."""
    return [(name, fn) for name, (_, fn) in sorted(_SECTIONS.items(), key=lambda kv: (kv[1][0], kv[0]))]
