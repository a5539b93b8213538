"""The ``negvision`` command line: a typer app whose groups are imported lazily (``--help`` stays fast)."""

from __future__ import annotations

import errno
import importlib

import click
import typer
from typer.core import TyperGroup

from vision.cli_common import EXIT_USAGE, EXIT_USER_ERROR, report_error, usage_error

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

# the optional extra each group needs: (extra name, packages that must be importable)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "generate": ("diffusion", ("diffusers", "transformers")),
    "neon": ("diffusion", ("diffusers",)),
    "retrieval": ("ood", ("open_clip",)),
    "ood": ("ood", ("open_clip",)),
}
# top-level package of an import -> the extra that brings it
PACKAGE_EXTRA = {"diffusers": "diffusion", "transformers": "diffusion", "imageio": "diffusion", "open_clip": "ood",
                 "fastapi": "api", "uvicorn": "api", "multipart": "api", "prometheus_client": "api",
                 "tensorboard": "tb", "onnx": "export", "onnxruntime": "export", "onnxscript": "export"}

VERBOSITY_FLAGS = {"-q": -1, "--quiet": -1, "-v": 1, "--verbose": 1, "-vv": 2}


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """The packages of ``packages`` that cannot be imported (nothing is imported)."""
    import importlib.util

    out = []
    for name in packages:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def extra_hint(extra: str, what: str) -> str:
    """The message for a missing optional extra."""
    return f"{what} needs the '{extra}' extra: pip install 'negvision[{extra}]'"


def _missing_extra_group(name: str, extra: str, missing: list[str], help_text: str) -> click.Command:
    """A stand-in group for a command whose optional extra is not installed: any use exits 2 with the hint."""
    app = typer.Typer(help=f"{help_text} (needs: pip install 'negvision[{extra}]')", add_completion=False)

    @app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def _missing(ctx: typer.Context) -> None:
        usage_error(f"{extra_hint(extra, f'negvision {name}')} (missing: {', '.join(missing)})")

    cmd = typer.main.get_command(app)
    cmd.name = name
    return cmd


def _planned_group(name: str, help_text: str) -> click.Command:
    app = typer.Typer(help=help_text, no_args_is_help=False)

    @app.callback(invoke_without_command=True)
    def _not_yet(ctx: typer.Context) -> None:
        typer.echo(f"negvision {name}: {help_text}", err=True)
        raise typer.Exit(EXIT_USAGE)

    return typer.main.get_command(app)


def _plain_help(cmd: click.Command) -> None:
    """Every group's help in the same plain click layout as the root's (typer's rich boxes show flags as <bool>)."""
    if hasattr(cmd, "rich_markup_mode"):
        cmd.rich_markup_mode = None
    for sub in getattr(cmd, "commands", {}).values():
        _plain_help(sub)


class LazyGroup(TyperGroup):
    """Root group that imports each sub-app on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(GROUPS) | set(PLANNED))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Two things click cannot express: ``-q`` / ``-v`` anywhere on the line (they set logging for the whole
        run), and ``--resume`` with an optional value (a bare ``--resume`` means OUT's newest checkpoint)."""
        from vision.cli_options import RESUME_LAST

        out: list[str] = []
        verbosity = 0
        for i, a in enumerate(args):
            if a == "--":
                out.extend(args[i:])
                break
            if a in VERBOSITY_FLAGS:
                verbosity = VERBOSITY_FLAGS[a]
                continue
            out.append(a)
            if a == "--resume" and (i + 1 >= len(args) or args[i + 1].startswith("-")):
                out.append(RESUME_LAST)
        ctx.meta["negvision.verbosity"] = verbosity
        from vision.cli_common import setup_logging

        setup_logging(verbosity)
        return super().parse_args(ctx, out)

    def invoke(self, ctx: click.Context) -> object:
        """Registry misses and missing optional packages end in one line (exit 2), not a traceback."""
        from vision.registry import RegistryError

        try:
            return super().invoke(ctx)
        except RegistryError as e:
            usage_error(str(e))
        except ImportError as e:  # ModuleNotFoundError, or a package that refuses to import
            top = (e.name or "").split(".")[0]
            if top not in PACKAGE_EXTRA:
                top = next((p for p in PACKAGE_EXTRA if f" {p}" in f" {e}" or f"'{p}'" in str(e)), "")
            if not top:
                raise
            usage_error(f"{extra_hint(PACKAGE_EXTRA[top], 'this command')} (missing: {top})")

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in EXTRAS:
            extra, packages = EXTRAS[cmd_name]
            missing = missing_packages(packages)
            if missing:
                return _missing_extra_group(cmd_name, extra, missing, GROUPS[cmd_name][1])
        if cmd_name in GROUPS:
            target, _ = GROUPS[cmd_name]
            mod_name, attr = target.split(":")
            sub = getattr(importlib.import_module(mod_name), attr)
            cmd = typer.main.get_command(sub)
            cmd.name = cmd_name
            _plain_help(cmd)
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


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"negvision {version('negvision')}")
    except PackageNotFoundError:  # running from a source tree that was never installed
        typer.echo("negvision (not installed)")
    raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, expose_value=False,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors (anywhere on the line)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug messages too (anywhere on the line)."),
) -> None:
    """negvision command line."""


# file-system errors on the paths a user gave (an output folder that is a file, no permission, a full disk): one
# line naming the path and what is wrong, exit 1, instead of a traceback from whichever command hit it
_PATH_ERRNOS = {errno.EACCES: "no permission", errno.EPERM: "not permitted",
                errno.EEXIST: "a file of that name is in the way of a folder",
                errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EISDIR: "it is a folder, a file was expected",
                errno.ENOSPC: "the disk is full; finished files are whole (they are written atomically)",
                errno.EDQUOT: "over the disk quota; finished files are whole (they are written atomically)",
                errno.EROFS: "the file system is read-only"}


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except OSError as e:
        why = _PATH_ERRNOS.get(e.errno or -1)
        if why is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        report_error(f"{where}{e.strerror or e} ({why})")
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
