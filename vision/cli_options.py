"""The options every ``negvision`` command shares, with one name each, and the config-file support.

Naming rule (see the README's CLI section): one spelling per concept across groups — ``--out`` (output folder or
run folder), ``--batch`` (images per step or per forward pass), ``--workers``, ``--device``, ``--amp``, ``--seed``,
``--resume [PATH]``, ``--exist-ok``, ``--config``, ``--skip-bad``; ``--epochs`` / ``--max-steps`` count training;
``--steps`` counts sampler (denoising) steps; ``--conf`` is a score threshold on predictions. Choice options are
enums that click checks while parsing (a wrong value exits 2 with the allowed values, before any heavy import).
"""

from __future__ import annotations

import enum
import functools
import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand

from vision.cli_common import DEVICE_HELP, usage_error


class Amp(str, enum.Enum):
    """Mixed precision: auto = bf16 / fp16 on a GPU, off on the CPU."""

    auto = "auto"
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Optimizer(str, enum.Enum):
    sgd = "sgd"
    adamw = "adamw"
    adam = "adam"


class Scheduler(str, enum.Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


def device_option() -> Any:
    return typer.Option(None, "--device", help=DEVICE_HELP)


def cpu_option() -> Any:
    return typer.Option(False, "--cpu", help="Alias of --device cpu.")


def amp_option() -> Any:
    return typer.Option(Amp.auto, "--amp", help="Mixed precision: auto (bf16/fp16 on a GPU, off on the CPU), no, fp16, "
                        "bf16.")


def batch_option(default: int, what: str = "Images per step per process.") -> Any:
    return typer.Option(default, "--batch", "--batch-size", min=1, help=what)


def workers_option(default: int = 2) -> Any:
    return typer.Option(default, "--workers", min=0, help="DataLoader worker processes.")


def seed_option(default: int = 0) -> Any:
    return typer.Option(default, "--seed", help="Random seed.")


def out_option(default: Path | None, what: str = "Run folder (config, checkpoints, logs, pictures).") -> Any:
    if default is None:
        return typer.Option(..., "--out", "--out-dir", help=what)
    return typer.Option(default, "--out", "--out-dir", help=what)


def resume_option() -> Any:
    return typer.Option(None, "--resume", metavar="[PATH]",
                        help="Continue OUT's newest checkpoint (verified; falls back to the previous one if damaged), "
                             "or the checkpoint folder PATH.")


def checkpoint_every_option() -> Any:
    return typer.Option(0, "--checkpoint-every", min=0, help="Also checkpoint every N optimizer steps (a killed run "
                        "then loses at most N steps; 0: at the end of each epoch only).")


def deterministic_option() -> Any:
    return typer.Option(False, "--deterministic", help="PyTorch's deterministic kernels: bit-identical GPU runs for one "
                        "seed, at some speed cost (CPU runs are bit-identical without it).")


def exist_ok_option() -> Any:
    return typer.Option(False, "--exist-ok", help="Reuse OUT, removing its earlier logs and checkpoints (default: a "
                        "used OUT makes OUT2, OUT3, ...).")


def skip_bad_option(what: str = "Skip bad images/labels (counted, listed in OUT/skipped.txt); default: list the "
                    "problems and stop.") -> Any:
    return typer.Option(False, "--skip-bad", help=what)


def keep_last_option() -> Any:
    return typer.Option(2, "--keep-last", min=1, help="Checkpoints kept (the newest and N-1 older ones).")


# ------------------------------------------------------------------------------------------ value helpers

RESUME_LAST = "last"  # what a bare --resume means (the root group inserts it: click has no optional values)


def parse_resume(value: str | None) -> bool | str:
    """``--resume`` -> True (OUT's newest checkpoint); ``--resume PATH`` -> PATH; absent -> False."""
    if value is None or value.lower() in ("false", "no", "0", ""):
        return False
    if value.lower() in (RESUME_LAST, "true", "yes", "1"):
        return True
    if not Path(value).exists():
        usage_error(f"--resume {value}: no such checkpoint folder (give no value to continue OUT's newest checkpoint)")
    return value


def resolve_device(device: str | None, cpu: bool = False) -> str | None:
    """The device string of ``--device`` (``--cpu`` is its alias); exits 2 on a malformed value."""
    if cpu:
        if device not in (None, "cpu"):
            usage_error(f"--cpu and --device {device} contradict each other")
        return "cpu"
    if device is None:
        return None
    d = device.strip().lower()
    head, _, idx = d.partition(":")
    if head not in ("cpu", "cuda", "mps") or (idx and not idx.isdigit()) or (idx and head != "cuda"):
        usage_error(f"--device '{device}': expected cpu, cuda, cuda:N or mps")
    return d


def enum_value(v: Any) -> Any:
    """The plain value of an enum option (and of lists / paths) for configs and JSON."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [enum_value(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------ config files

CONFIG_FILE = "config.yaml"
NOT_IN_CONFIG = ("config", "resume", "exist_ok", "help")  # options a replayed run should not inherit


def _load_config(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: the YAML's keys become the command's defaults (command-line options win)."""
    if value is None or ctx.resilient_parsing:
        return value
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path} ({e})", ctx, param) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise typer.BadParameter(f"{where}: invalid YAML", ctx, param) from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of option names to values", ctx, param)
    names = {p.name: p for p in ctx.command.params if getattr(p, "param_type_name", "") == "option"}
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in names or name in ("config", "help"):
            import difflib

            close = difflib.get_close_matches(name, [n for n in names if n not in ("config", "help")], n=3)
            hint = f" (did you mean: {', '.join(c.replace('_', '-') for c in close)}?)" if close else ""
            raise typer.BadParameter(f"{path}: unknown key '{key}' for 'negvision {ctx.command_path.split(' ', 1)[-1]}'"
                                     f"{hint}", ctx, param)
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option() -> Any:
    return typer.Option(None, "--config", callback=_load_config, is_eager=True, exists=True, dir_okay=False,
                        help="YAML of option values (keys = option names; command-line options override it); "
                             "every run folder writes its own config.yaml, so --config OUT/config.yaml replays a run.")


def run_config(params: dict[str, Any]) -> dict[str, Any]:
    """The resolved options of a command, as written to the run folder's config.yaml."""
    return {k: enum_value(v) for k, v in params.items() if k not in NOT_IN_CONFIG}


def run_options(ctx: typer.Context, **overrides: Any) -> Any:
    """The :class:`~vision.engine.config.RunOptions` of a training command, built once from its shared options
    (``out``, ``resume``, ``exist_ok``, ``keep_last``, ``device`` / ``cpu``, ``workers``, ``skip_bad``; those it does not
    have keep their defaults) with its resolved options as the run's config file; ``overrides`` replace fields."""
    from vision.engine.config import RunOptions

    p = ctx.params
    given = {"out": p.get("out"), "resume": parse_resume(p.get("resume")), "exist_ok": p.get("exist_ok"),
             "keep_last": p.get("keep_last"), "device": resolve_device(p.get("device"), bool(p.get("cpu"))),
             "workers": p.get("workers"), "skip_bad": p.get("skip_bad"), "config": run_config(p)}
    return RunOptions(**{**{k: v for k, v in given.items() if v is not None}, **overrides})


# ------------------------------------------------------------------------------------------ resuming a run

# options a continued run may change: how it runs (processes, device, precision, checkpoints), and how long it trains
# (a finished run is extended with a larger --epochs / --max-steps). Anything else makes it a different run.
RESUME_MAY_CHANGE = frozenset({"epochs", "max_steps", "workers", "device", "cpu", "amp", "deterministic", "keep_last",
                               "checkpoint_every", "save_every", "eval_every", "progress", "out"})


def _hint_type(hint: Any) -> Any:
    """The non-None member of an optional annotation (``Path | None`` -> ``Path``)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return members[0] if len(members) == 1 else hint
    return hint


def _as_option_value(hint: Any, value: Any) -> Any:
    """A value read from a run's config.yaml, as the command's parameter would hold it (enum, Path)."""
    kind = _hint_type(hint)
    if value is None or not isinstance(kind, type):
        return value
    if issubclass(kind, enum.Enum) or issubclass(kind, Path):
        return kind(value)
    return value


def _same_value(given: Any, recorded: Any) -> bool:
    given = enum_value(given)
    if isinstance(given, str) and isinstance(recorded, str) and given != recorded:
        try:  # one path spelled two ways (runs/x, ./runs/x, an absolute path)
            return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()
        except (OSError, RuntimeError):
            return False
    return given == recorded


def resolve_resumed_options(ctx: typer.Context, command: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """With ``--resume``, a run continues with the options it was started with (ultralytics habit).

    Options left out on the command line take the run's values (``OUT/config.yaml``, or ``config.resumed.yaml``
    after an earlier resume). An option given with another value is refused in one line naming it (exit 2), unless
    it is in :data:`RESUME_MAY_CHANGE` (how the run is executed, and how long it trains), or ``--resume PATH``
    names a checkpoint of another run folder than ``--out``: that starts a new run from the checkpoint, where any
    option may change."""
    from vision.engine.run import read_run_options

    value = parse_resume(kwargs.get("resume"))
    out = kwargs.get("out")
    if not value or out is None:
        return kwargs
    source_run = Path(out) if value is True else Path(value)
    try:
        found = read_run_options(source_run)
    except ValueError as e:
        usage_error(str(e))
    if found is None:  # a run folder from before config.yaml, or a bare checkpoint: the command line as given
        return kwargs
    recorded, path = found
    same_run = value is True or path.parent.resolve() == Path(out).expanduser().resolve()
    hints = typing.get_type_hints(command)
    flags = {p.name: p.opts[0] for p in ctx.command.params if getattr(p, "opts", None)}
    merged = dict(kwargs)
    taken: list[str] = []
    for name, given in kwargs.items():
        if name in NOT_IN_CONFIG or name not in recorded or name not in flags:
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":  # (typer carries its own click: compare by name)
            merged[name] = _as_option_value(hints.get(name), recorded[name])
            if not _same_value(given, recorded[name]):
                taken.append(f"{flags[name]} {recorded[name]}")
        elif same_run and name not in RESUME_MAY_CHANGE and not _same_value(given, recorded[name]):
            usage_error(f"{flags[name]} {enum_value(given)} differs from the run's {recorded[name]} ({path}): a resumed "
                        f"run keeps its options; to start a new run from one of its checkpoints, give --resume "
                        f"CHECKPOINT_FOLDER and a new --out")
    if taken:
        typer.echo(f"resuming with the run's options from {path}: {', '.join(taken)}", err=True)
    ctx.params.update(merged)
    return merged


def resumable(command: Callable) -> Callable:
    """Decorate a training command (whose first parameter is ``ctx: typer.Context``) so that ``--resume`` continues the run with its own options
    (:func:`resolve_resumed_options`); the command's signature, and so its CLI, is unchanged."""

    @functools.wraps(command)
    def wrapper(ctx: typer.Context, **kwargs: Any) -> Any:
        return command(ctx, **resolve_resumed_options(ctx, command, kwargs))

    return wrapper


# ---------------------------------------------------------------------------------------- registry-driven choices
@dataclass(frozen=True)
class RegistryChoice:
    """An option whose values are the names in a registry, read when they are needed (checking a value, showing a
    command's ``--help``) and not when the CLI is built (registries live in modules that import torch): a new
    format, layout, describer or mode needs no CLI edit.

    ``source``: ``"module:attribute"`` naming a :class:`vision.registry.Registry` (its names), a sequence of names,
    or a function returning them (called with ``args``); ``extra``: values beside the registry's (e.g. ``auto``)."""

    flag: str
    source: str
    what: str
    extra: tuple[str, ...] = ()
    args: tuple[Any, ...] = ()

    def _source(self) -> Any:
        module, _, attr = self.source.partition(":")
        return getattr(importlib.import_module(module), attr)

    def names(self) -> list[str]:
        obj = self._source()
        if hasattr(obj, "names"):
            names = obj.names()
        elif callable(obj):
            names = obj(*self.args)
        else:
            names = list(obj)
        return [*self.extra, *names]

    def check(self, value: Any) -> Any:
        """Option callback: ``value`` if it is one of the names, else exit 2 listing them."""
        if value is None or value in self.extra:
            return value
        obj = self._source()
        if hasattr(obj, "get"):  # a Registry: its error names close matches and every registered name
            from vision.registry import RegistryError

            try:
                obj.get(value)
            except RegistryError as e:
                usage_error(f"{self.flag}: {e}")
            return value
        names = self.names()
        if value not in names:
            usage_error(f"{self.flag}: '{value}' is not one of {', '.join(repr(n) for n in names)} ({self.what}).")
        return value

    def help(self) -> str:
        return f"{self.what[0].upper()}{self.what[1:]}: {' | '.join(self.names())}."

    def option(self, default: Any, *aliases: str) -> Any:
        """The ``typer.Option`` (its help is completed by :func:`registry_command` when ``--help`` is shown)."""
        return typer.Option(default, self.flag, *aliases, callback=self.check,
                            help=f"{self.what[0].upper()}{self.what[1:]} (listed by this command's --help).")


class RegistryCommand(TyperCommand):
    """A command whose registry-driven options get their list of values when its help is shown."""

    choices: ClassVar[dict[str, RegistryChoice]] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for p in self.params:
            if p.name in self.choices:
                p.help = self.choices[p.name].help()
        super().format_help(ctx, formatter)


def registry_command(**choices: RegistryChoice) -> type[RegistryCommand]:
    """``cls=`` of a command with registry-driven options, keyed by parameter name: ``@app.command("x",
    cls=registry_command(fmt=FORMAT_CHOICE))``."""
    return type("RegistryCommand", (RegistryCommand,), {"choices": dict(choices)})
