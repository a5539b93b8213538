"""Small helpers shared by the command-line groups."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 1."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


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
