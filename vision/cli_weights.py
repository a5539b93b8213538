"""`negvision weights`: list the known weights, print where one is, verify sha256 sums."""

from __future__ import annotations

from typing import Annotated

import typer

from vision import weights as W
from vision.cli_common import EXIT_USER_ERROR, fail

app = typer.Typer(help="Known weights: list, locate, verify", no_args_is_help=True, add_completion=False)


def _short(text: str, width: int = 56) -> str:
    """Shorten long sources (URLs) with a middle ellipsis."""
    return text if len(text) <= width else text[: width // 2 - 2] + "..." + text[-(width // 2 - 1):]


@app.command("list")
def list_cmd() -> None:
    """Table of known weights: name, kind, source and where the file was found (or 'missing')."""
    rows = [("NAME", "KIND", "SOURCE", "FOUND AT")]
    for e in W.list_weights():
        path = W.find_weights(e["name"])
        rows.append((e["name"], e["kind"], _short(e["source"]), str(path) if path else "missing"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    typer.echo(f"\nmanifest: {W.manifest_path()}; offline use: {W.README_HINT}")


@app.command("path")
def path_cmd(
    name: Annotated[str, typer.Argument(help="manifest name (see `list`) or a file path")],
    download: Annotated[bool, typer.Option("--download/--no-download", help="fetch it when missing")] = False,
) -> None:
    """Print the local path of NAME; exit 1 with the reason when missing (downloads only with --download)."""
    try:
        typer.echo(str(W.resolve_weights(name, download=download)))
    except W.WeightsNotFoundError as e:
        fail(str(e))


@app.command("verify")
def verify_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="names to check (default: all)")] = None,
) -> None:
    """Check sha256 sums against the manifest; exit 1 on a mismatch (or a named file that is missing)."""
    explicit = bool(names)
    try:
        todo = names or [e["name"] for e in W.list_weights()]
        failed = False
        for n in todo:
            ok, msg = W.verify_weights(n)
            missing = msg.startswith("missing")
            status = "ok" if ok else ("missing" if missing else "FAIL")
            typer.echo(f"{status:<8}{n}: {msg}")
            failed |= (not ok) and (explicit or not missing)
    except W.WeightsNotFoundError as e:
        fail(str(e))
    if failed:
        raise typer.Exit(EXIT_USER_ERROR)


def main() -> None:  # pragma: no cover - `python -m vision.cli_weights`
    """Run the weights CLI on its own."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
