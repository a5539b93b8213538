"""`negvision neon`: merge, selftrain, sweep. torch/diffusers are imported inside the commands only."""

from __future__ import annotations

import enum
import json
import warnings
from pathlib import Path

import typer

from vision import cli_options as opt
from vision.cli_common import fail, interrupted, usage_error

neon_app = typer.Typer(
    help="Neon: self-train a diffusion model, then merge weights in the negative direction "
    "(theta_neon = (1 + w) * theta_base - w * theta_selftrained).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, ImportError)


class EmaMode(str, enum.Enum):
    """Which weights ``neon merge`` uses when a checkpoint carries EMA weights (``diffusion.neon.files.EMA_MODES``)."""

    ema = "ema"
    model = "model"
    both = "both"


def _call(fn, *args, show_warnings: bool = False, usage: tuple[type[Exception], ...] = (), **kwargs):
    """``fn(*args, **kwargs)``; an exception of a ``usage`` type (an option the model cannot take) exits 2, any other
    user error (bad input, missing file, unsupported model) exits 1, each with its message.
    With ``show_warnings`` every warning of the call is printed once as ``warning: ...``."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=show_warnings) as rec:
            if show_warnings:
                warnings.simplefilter("always")
            out = fn(*args, **kwargs)
            caught = rec or []
    except usage as e:
        usage_error(str(e))
    except _USER_ERRORS as e:
        fail(str(e))
    for c in caught:
        typer.echo(f"warning: {c.message}", err=True)
    return out


def _option(fn, *args):
    """``fn(*args)`` checking an option's value before the run: its ValueError exits 2 (warnings are left to the
    run, which gives them again)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    except ValueError as e:
        usage_error(str(e))


def _lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    if not path.is_file():
        fail(f"prompts file '{path}' does not exist")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        usage_error(f"bad --class-labels '{text}' (expected comma-separated integers)")


@neon_app.command("merge")
def merge_cmd(
    base: Path = typer.Option(..., "--base", help="Base checkpoint: .safetensors/.pt file, model folder or pipeline folder."),
    selftrained: Path = typer.Option(..., "--selftrained", help="Self-trained checkpoint (same kinds, or a Trainer checkpoint dir)."),
    w: float = typer.Option(1.0, "--w", help="Extrapolation weight w (> 0 moves away from the self-trained model)."),
    out: Path = opt.out_option(None, "Output file or folder (same format as --base)."),
    component: str = typer.Option(None, "--component", help="Pipeline component to merge (default: unet/transformer)."),
    ema: EmaMode = typer.Option(EmaMode.ema, "--ema", help="With EMA weights present, merge the EMA weights (default), "
                                "the model's, or both."),
) -> None:
    """Merge two checkpoints tensor by tensor: theta_neon = (1 + w) * base - w * selftrained."""

    from .files import merge_checkpoints
    from .merge import check_w

    _option(check_w, w)
    if out.resolve() in (base.resolve(), selftrained.resolve()):
        usage_error(f"--out '{out}' must differ from the inputs")
    info = _call(merge_checkpoints, base, selftrained, out, w, component=component, ema=ema.value, show_warnings=True)
    typer.echo(json.dumps(info))


@neon_app.command("selftrain")
@opt.resumable
def selftrain_cmd(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="Base diffusers pipeline folder."),
    num_samples: int = typer.Option(1000, "--num-samples", min=1, help="Images to sample from the base model."),
    max_steps: int = typer.Option(1000, "--max-steps", "--steps", min=1,
                                  help="Fine-tuning optimizer steps. --steps is its old spelling, still accepted "
                                       "(elsewhere --steps counts sampler steps: here that is --num-inference-steps)."),
    out: Path = opt.out_option(None, "Run folder (config.yaml, samples grid, train/ logs + checkpoints, pipeline/); "
                               "a used one makes OUT2, OUT3, ... unless --resume or --exist-ok."),
    save_every: int = typer.Option(0, "--save-every", min=0, help="Keep a checkpoint every k steps (0: end only)."),
    batch: int = opt.batch_option(32, "Fine-tuning images per optimizer step."),
    sample_batch_size: int = typer.Option(64, "--sample-batch-size", min=1, help="Images per sampling call."),
    lr: float = typer.Option(1e-4, "--lr"),
    num_inference_steps: int = typer.Option(None, "--num-inference-steps", min=1,
                                            help="Sampler (denoising) steps per sample (pipeline default if unset)."),
    prompts: Path = typer.Option(None, "--prompts", help="Text file, one prompt a line (text-to-image pipelines)."),
    class_labels: str = typer.Option(None, "--class-labels", help="Comma-separated class ids (class-conditional; default: every class in turn)."),
    guidance_scale: float = typer.Option(None, "--guidance-scale", help="Sampling guidance (Flux-dev: its distilled "
                                         "guidance, also used while fine-tuning)."),
    height: int = typer.Option(None, "--height", min=8, help="Sample height (pipeline default if unset)."),
    width: int = typer.Option(None, "--width", min=8, help="Sample width (pipeline default if unset)."),
    max_sequence_length: int = typer.Option(None, "--max-sequence-length", min=1,
                                            help="T5 tokens of SD3 / Flux prompts (pipeline default if unset)."),
    seed: int = opt.seed_option(),
    device: str | None = opt.device_option(),
    amp: opt.Amp = opt.amp_option(),
    resume: str | None = opt.resume_option(),
    exist_ok: bool = opt.exist_ok_option(),
    workers: int = opt.workers_option(0),
    deterministic: bool = opt.deterministic_option(),
    config: Path | None = opt.config_option(),
) -> None:
    """Sample N images from the base model and fine-tune it on them with the denoising loss."""
    run = opt.run_options(ctx)  # checks --device and --resume before the heavy imports
    from vision.engine import TrainConfig, TrainingInterrupted

    from .selftrain import ConditioningError, SelfTrainConfig, self_train

    settings = SelfTrainConfig(
        num_samples=num_samples, save_every=save_every, sample_batch_size=sample_batch_size,
        num_inference_steps=num_inference_steps, prompts=_lines(prompts), class_labels=_ints(class_labels),
        guidance_scale=guidance_scale, height=height, width=width, max_sequence_length=max_sequence_length,
    )
    train = TrainConfig(max_steps=max_steps, batch_size=batch, lr=lr, seed=seed, mixed_precision=amp.value,
                        deterministic=deterministic)
    try:
        info = _call(self_train, model, settings, train, run, usage=(ConditioningError,))
    except TrainingInterrupted as e:
        interrupted(f"{e} (negvision neon selftrain ... --resume)")
    typer.echo(json.dumps(info))


@neon_app.command("sweep")
def sweep_cmd(
    base: Path = typer.Option(..., "--base", help="Base diffusers pipeline folder."),
    selftrained: Path = typer.Option(..., "--selftrained", help="Self-trained pipeline/model folder or weights file."),
    w: str = typer.Option("0,0.5,1,1.5,2", "--w", help="Comma-separated w values."),
    reference: Path = typer.Option(..., "--reference", help="Folder of real images to compare against."),
    out: Path = opt.out_option(None, "Output folder (sweep.csv, fid_vs_w.png, samples/)."),
    features: str = typer.Option(
        "pixels", "--features",
        help="Feature extractor: inception:PATH, torch-fidelity:PATH, export:PATH (.pt2), torchscript:PATH, module:factory, pixels[:N].",
    ),
    num_samples: int = typer.Option(1000, "--num-samples", min=2),
    batch: int = opt.batch_option(64, "Images per sampling call and per feature batch."),
    num_inference_steps: int = typer.Option(None, "--steps", "--num-inference-steps", min=1,
                                            help="Sampler (denoising) steps per sample (pipeline default if unset)."),
    guidance_scale: str = typer.Option(None, "--guidance-scale", help="Comma-separated guidance scales to sweep too."),
    prompts: Path = typer.Option(None, "--prompts"),
    class_labels: str = typer.Option(None, "--class-labels"),
    seed: int = opt.seed_option(),
    k: int = typer.Option(3, "--k", min=1, help="k of the k-NN precision/recall."),
    max_reference: int = typer.Option(None, "--max-reference", help="Use at most this many reference images."),
    device: str | None = opt.device_option(),
) -> None:
    """For each w: merge, sample, score (FID, precision, recall); write a CSV and a plot; print the best w."""
    dev = opt.resolve_device(device)
    from .metrics import FeatureSpecError
    from .selftrain import ConditioningError
    from .sweep import SweepConfig, neon_sweep, parse_floats

    ws = _option(parse_floats, w, "w")
    gss = _option(parse_floats, guidance_scale, "guidance scale") if guidance_scale else None
    config = SweepConfig(
        features=features, num_samples=num_samples, batch_size=batch, num_inference_steps=num_inference_steps,
        guidance_scales=gss, prompts=_lines(prompts), class_labels=_ints(class_labels), seed=seed, k=k,
        max_reference=max_reference,
    )
    info = _call(neon_sweep, base, selftrained, ws, out, reference=reference, config=config, device=dev,
                 usage=(ConditioningError, FeatureSpecError))
    for r in info["rows"]:
        gs = f" gs={r['guidance_scale']}" if r["guidance_scale"] != "" else ""
        typer.echo(f"w={r['w']:g}{gs}  FID={r['fid']:.4g}  precision={r['precision']:.3f}  recall={r['recall']:.3f}", err=True)
    typer.echo(json.dumps({k_: v for k_, v in info.items() if k_ != "rows"}))
