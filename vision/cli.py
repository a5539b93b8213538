"""The ``negvision`` command line: a typer app whose groups are imported lazily (``--help`` stays fast)."""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup

# group name -> ("module:attribute" of a typer.Typer, one-line help). Imported only when the group is used.
GROUPS: dict[str, tuple[str, str]] = {
    "detect": ("detectors.cli:detect_app", "ATSS object detectors: train, eval, predict on image folders."),
    "demo": ("detectors.cli:demo_app", "The main job: train ATSS on a generated digits set, evaluate, predict."),
    "data": ("vision.cli_data:app", "Data sets: make the sample digits set, inspect and check folders."),
    "weights": ("vision.cli_weights:app", "Known weights: list, locate, verify."),
    "defect": ("detectors.segdec.cli:app", "Two-stage surface-defect network (SegDecNet): train, eval, predict."),
    "generate": ("diffusion.perpneg.cli:generate_app", "Perp-Neg guided generation: images, views, text-to-3D."),
    "neon": ("diffusion.neon.cli:neon_app", "Neon: self-train, merge weights in the negative direction, sweep w."),
    "retrieval": ("clip_ood.dcar.cli:retrieval_app", "DCAR dual prompt learning for image-text retrieval."),
    "ood": ("clip_ood.cli:ood_app", "Zero-shot OOD scoring with CLIP and negative labels: mine, score, bench, serve."),
}

# groups whose capability has not landed yet: their help says so, and using them exits with a clear message
PLANNED: dict[str, str] = {}


def _planned_group(name: str, help_text: str) -> click.Command:
    app = typer.Typer(help=help_text, no_args_is_help=False)

    @app.callback(invoke_without_command=True)
    def _not_yet(ctx: typer.Context) -> None:
        typer.echo(f"negvision {name}: {help_text}", err=True)
        raise typer.Exit(2)

    return typer.main.get_command(app)


class LazyGroup(TyperGroup):
    """Root group that imports each sub-app on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(GROUPS) | set(PLANNED))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in GROUPS:
            target, _ = GROUPS[cmd_name]
            mod_name, attr = target.split(":")
            sub = getattr(importlib.import_module(mod_name), attr)
            cmd = typer.main.get_command(sub)
            cmd.name = cmd_name
            return cmd
        if cmd_name in PLANNED:
            return _planned_group(cmd_name, PLANNED[cmd_name])
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, GROUPS[n][1]) for n in sorted(GROUPS)] + [(n, PLANNED[n]) for n in sorted(PLANNED)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=LazyGroup,
    help="negvision: vision methods built on choosing and weighting positive and negative samples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    """negvision command line."""
    if version:
        from importlib.metadata import version as v

        typer.echo(v("negvision"))
        raise typer.Exit(0)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
