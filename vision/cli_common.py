"""What every command-line group shares: how errors end a command (exit 1: bad input or a failed run, exit 2:
a usage error such as a bad option value), shared option help, ``--pretrained`` parsing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import typer

EXIT_USER_ERROR = 1  # bad input data, missing file, a run that failed
EXIT_USAGE = 2  # a bad option value or combination (click's own usage errors use 2 as well)
EXIT_INTERRUPTED = 130

DEVICE_HELP = "cpu, cuda, cuda:1, mps (default: the best available)."


def report_error(msg: str, where: str = "") -> None:
    """Print ``error: msg`` (``WHERE: error: msg`` for one part of a command's work, e.g. a split) to stderr: the one
    form of every error line; the command goes on or exits."""
    typer.echo(f"{where}: error: {msg}" if where else f"error: {msg}", err=True)


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 1 (user error: bad input, missing file, failed run)."""
    report_error(msg)
    raise typer.Exit(EXIT_USER_ERROR)


def usage_error(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 2 (a bad option value or combination)."""
    report_error(msg)
    raise typer.Exit(EXIT_USAGE)


def interrupted(msg: str) -> NoReturn:
    """Print ``msg`` (what was saved, how to go on) to stderr and exit with status 130 (a run stopped by a signal)."""
    typer.echo(msg, err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def parse_pretrained(value: str) -> bool | str:
    """``--pretrained`` values: true / false (and synonyms) or an existing weights file."""
    v = value.lower()
    if v in ("true", "yes", "1", "imagenet"):
        return True
    if v in ("false", "no", "0", "none"):
        return False
    if not Path(value).is_file():
        fail(f"--pretrained '{value}': not true/false and no such file")
    return value


# ------------------------------------------------------------------------------------------ logging

LOG_NAMESPACES = ("negvision", "vision", "detectors", "diffusion", "clip_ood")


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes log records to stderr without breaking a tqdm bar that is being drawn there."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - tqdm is a dependency; never lose a log line
            super().emit(record)


def setup_logging(verbosity: int = 0) -> None:
    """Show the project's log messages on stderr: INFO by default, DEBUG with -v, WARNING with -q (verbosity -1).

    Other libraries stay at WARNING. Called once by the ``negvision`` entry point; idempotent.
    """
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _TqdmSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"))
    for name in LOG_NAMESPACES:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if isinstance(h, _TqdmSafeHandler)]:
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(level)
