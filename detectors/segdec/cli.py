"""``negvision defect``: train / eval / predict the two-stage surface-defect network (SegDecNet)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import typer

from vision import cli_options as opt
from vision.cli_common import fail, interrupted, parse_pretrained, usage_error

app = typer.Typer(
    help="Two-stage surface-defect network (SegDecNet): train, eval, predict on defect image folders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# the defect layouts of the format registry (task "defect"), read when needed: a new layout needs no edit here
DATASET_KIND = opt.RegistryChoice("--dataset-kind", "vision.data.formats:format_names", "defect layout",
                              extra=("auto",), args=("defect",))




def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_metrics(res: dict) -> None:
    keys = ("AP", "AUROC", "FP", "FN", "FP_at_FN0", "detection_rate", "accuracy", "threshold", "dice", "iou")
    typer.echo("  ".join(f"{k}={_fmt(res[k])}" for k in keys if k in res))


class Method(str, enum.Enum):
    """segdec: the supervised two-stage network; patchcore: good images only (an anomaly baseline)."""

    segdec = "segdec"
    patchcore = "patchcore"


class HeatmapKind(str, enum.Enum):
    """What ``defect predict`` draws as the heatmap."""

    auto = "auto"
    segmentation = "segmentation"
    cam = "cam"


@app.command("train", cls=opt.registry_command(dataset_kind=DATASET_KIND))
@opt.resumable
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Data folder (KolektorSDD, KSDD2, DAGM, Severstal or generic)."),
    out: Path = opt.out_option(Path("runs/defect/exp"), "Run folder (config, checkpoints, logs, eval)."),
    dataset_kind: str = DATASET_KIND.option("auto"),
    method: Method = typer.Option(Method.segdec, "--method", help="segdec (the segmentation + decision network, "
                                  "trained on good and defective images) or patchcore (an anomaly scorer built "
                                  "from the good images only: k-NN distance of pretrained patch features)."),
    coreset_ratio: float = typer.Option(0.1, "--coreset-ratio", min=0.001, max=1.0,
                                        help="patchcore: share of the good images' patch features kept in the "
                                             "memory bank (greedy k-center coreset)."),
    img_size: str | None = typer.Option(None, "--img-size", help="N or WIDTHxHEIGHT, multiples of 8 "
                                           "(default: the dataset's official size; folders: the image size)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Default: the dataset preset (DAGM 70)."),
    batch: int | None = typer.Option(None, "--batch", "--batch-size", min=1,
                                     help="Images per step per process (preset: 1; Severstal 10)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (preset, e.g. DAGM 0.05)."),
    delta: float | None = typer.Option(None, "--delta", help="Weight of the decision loss (preset)."),
    p: float | None = typer.Option(None, "--p", help="Exponent of the distance weights (preset)."),
    w_pos: float | None = typer.Option(None, "--w-pos", help="Weight of the most central defect pixel (preset)."),
    dilate: int | None = typer.Option(None, "--dilate", help="Mask dilation kernel, 1 = none (preset)."),
    num_segmented: int | None = typer.Option(None, "--num-segmented",
                                                help="Keep pixel masks for only N defective training images "
                                                     "(0 = weakly supervised, where the official runs also use "
                                                 "--no-dynamic; default: all)."),
    no_dynamic: bool = typer.Option(False, "--no-dynamic", help="Fixed loss weights (1, delta) instead of dynamic balancing."),
    no_grad_adjust: bool = typer.Option(False, "--no-grad-adjust",
                                        help="Let the decision loss flow into the segmentation net."),
    grad_multiplier: float | None = typer.Option(None, "--grad-multiplier",
                                                    help="Explicit gradient multiplier (overrides --no-grad-adjust)."),
    no_frequency: bool = typer.Option(False, "--no-frequency", help="Uniform instead of frequency-of-use negatives."),
    no_weighted: bool = typer.Option(False, "--no-weighted", help="Plain BCE instead of distance-weighted seg loss."),
    weak_grad_multiplier: float = typer.Option(1.0, "--weak-grad-multiplier", help="Weak / mixed supervision: "
                                               "how much the decision loss of samples without a defect mask trains "
                                               "the trunk (0 = the official code: not at all)."),
    backbone: str = typer.Option("auto", "--backbone", help="auto (the paper's trunk with full masks, pretrained "
                                 "efficientnet_lite0.offline with fewer), paper, or a registry / timm backbone "
                                 "used at stride 8."),
    pretrained: str = typer.Option("auto", "--pretrained", help="Backbone weights: auto (true for an auto-chosen "
                                   "trunk) | true | false | PATH."),
    width: float = typer.Option(1.0, "--width", help="Channel multiplier of the paper's trunk (1 = the paper)."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment", help="Flips and 90-degree rotations "
                                        "(default: on in weak / mixed mode, off with full masks, as the official "
                                        "code)."),
    stats_head: bool | None = typer.Option(None, "--stats-head/--no-stats-head", help="The decision network's "
                                           "statistics branch (per-channel mean and log std of the trunk's maps; "
                                           "not in the paper). Default: on with the labels-only / mixed registry "
                                           "trunk."),
    optimizer: opt.Optimizer | None = typer.Option(None, "--optimizer", help="sgd | adamw | adam (default: the "
                                                   "preset's plain SGD; AdamW with a registry trunk)."),
    momentum: float | None = typer.Option(None, "--momentum", help="SGD momentum (default: the preset's 0)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Default: the preset's 0."),
    workers: int = opt.workers_option(2),
    device: str | None = opt.device_option(),
    cpu: bool = opt.cpu_option(),
    amp: opt.Amp = opt.amp_option(),
    resume: str | None = opt.resume_option(),
    exist_ok: bool = opt.exist_ok_option(),
    keep_last: int = opt.keep_last_option(),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Evaluate on the validation images every N "
                                             "epochs (default 1; 0 = never, the model is then the last epoch's)."),
    val_split: float = typer.Option(0.15, "--val-split", min=0.0, max=0.9,
                                    help="Share of the training images held out (stratified, the same for every "
                                         "seed) to pick the best epoch by validation AP; 0 = none."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validate on the training split of this data "
                                         "folder instead of a held-out share."),
    checkpoint_every: int = opt.checkpoint_every_option(),
    deterministic: bool = opt.deterministic_option(),
    skip_bad: bool = opt.skip_bad_option(),
    cache: bool = typer.Option(False, "--cache", help="Keep decoded images in memory (small data sets)."),
    dagm_class: int | None = typer.Option(None, "--dagm-class", help="DAGM: train on ClassN only."),
    fold: int = typer.Option(0, "--fold", help="KolektorSDD: which third of the kos folders is the test set."),
    seed: int = opt.seed_option(),
    config: Path | None = opt.config_option(),
) -> None:
    """Train SegDecNet (multi-GPU: `accelerate launch $(which negvision) defect train ...`)."""
    from vision.engine import TrainConfig, TrainingInterrupted, WeightsMismatchError

    from .config import SegDecConfig
    from .data import DatasetError
    from .train import train_segdec

    run = opt.run_options(ctx)
    if method is Method.patchcore:
        from .anomaly import PatchCoreConfig

        if backbone in ("paper", "none", ""):
            usage_error(f"--backbone {backbone}: patchcore needs a pretrained registry or timm backbone (default "
                        "auto: efficientnet_lite0.offline)")
        _train_patchcore(data, PatchCoreConfig(
            dataset_kind=dataset_kind, img_size=img_size, backbone=None if backbone == "auto" else backbone,
            pretrained=None if pretrained.lower() == "auto" else parse_pretrained(pretrained),
            coreset_ratio=coreset_ratio, batch=batch or 8, seed=seed, val_split=val_split, val_data=val_data,
            cache=cache, dagm_class=dagm_class, fold=fold), run)
        return
    config = SegDecConfig(
        dataset_kind=dataset_kind, img_size=img_size, delta=delta, p=p, w_pos=w_pos, dilate=dilate,
        dynamic=not no_dynamic, grad_adjust=not no_grad_adjust, grad_multiplier=grad_multiplier,
        weak_grad_multiplier=weak_grad_multiplier, frequency=not no_frequency, weighted=not no_weighted,
        num_segmented=num_segmented, backbone=backbone,
        pretrained=None if pretrained.lower() == "auto" else parse_pretrained(pretrained), width=width,
        stats_head=stats_head, augment=augment, val_split=val_split, val_data=val_data, cache=cache,
        dagm_class=dagm_class, fold=fold)
    train = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, optimizer=opt.enum_value(optimizer),
                        momentum=momentum, weight_decay=weight_decay, max_steps=max_steps, seed=seed,
                        eval_every=1 if eval_every is None else eval_every, checkpoint_every=checkpoint_every,
                        deterministic=deterministic, mixed_precision=amp.value)
    try:
        summary = train_segdec(data, config, train, run)
    except TrainingInterrupted as e:
        interrupted(f"{e} (negvision defect train ... --resume)")
    except (DatasetError, ValueError, FileNotFoundError, WeightsMismatchError) as e:
        fail(str(e))
        return
    typer.echo(f"trained {summary['steps']} steps; run folder: {summary['out']}")
    if "eval" in summary:
        _print_metrics(summary["eval"])
        typer.echo(f"evaluation written to {Path(summary['out']) / 'eval'}")


def _train_patchcore(data: Path, config: Any, run: Any) -> None:
    """``defect train --method patchcore``: fit the good-images-only scorer (no training steps, nothing to resume)."""
    from vision.engine import WeightsMismatchError

    from .anomaly import train_patchcore
    from .data import DatasetError

    if run.resume:
        usage_error("--resume: a patchcore run has no training steps to continue; run it again (--exist-ok to reuse "
                    "the folder)")
    try:
        summary = train_patchcore(data, config, run)
    except (DatasetError, ValueError, FileNotFoundError, WeightsMismatchError) as e:
        fail(str(e))
        return
    fit = summary["fit"]
    typer.echo(f"memory bank: {fit['bank_size']} patch features of {fit['bank_images']} good images "
               f"({fit['seconds']:.1f} s); run folder: {summary['out']}")
    if "eval" in summary:
        _print_metrics(summary["eval"])
        typer.echo(f"evaluation written to {Path(summary['out']) / 'eval'}")


@app.command("eval", cls=opt.registry_command(dataset_kind=DATASET_KIND))
def evaluate(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint folder or weights file."),
    data: Path | None = typer.Option(None, "--data", help="Data folder (default: the one trained on)."),
    dataset_kind: str | None = DATASET_KIND.option(None),
    split: str = typer.Option("test", "--split", help="test | train"),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: RUN/eval or runs/defect/eval)."),
    batch: int = opt.batch_option(8, "Images per forward pass."),
    seg_threshold: float = typer.Option(0.5, "--seg-threshold", help="Pixel threshold for Dice / IoU."),
    img_size: str | None = typer.Option(None, "--img-size", help="Only for bare weights files: N or WxH."),
    channels: int | None = typer.Option(None, "--channels", help="Only for bare weights files: 1 or 3."),
    dagm_class: int | None = typer.Option(None, "--dagm-class"),
    fold: int | None = typer.Option(None, "--fold"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images / bad masks (counted)."),
    max_images: int = typer.Option(16, "--max-images", help="Heatmaps drawn into heatmaps.jpg."),
    device: str | None = opt.device_option(),
) -> None:
    """Evaluate: AP, AUROC, FP/FN at the best-F1 threshold, FP at FN=0, detection rate, Dice / IoU; results.csv,
    PR and ROC plots, heatmaps."""
    from .data import DatasetError, load_defect_dataset
    from .evaluate import evaluate_segdec, save_eval_outputs
    from .spec import load_segdec

    try:
        model, spec = load_segdec(weights, opt.resolve_device(device), img_size=img_size, channels=channels)
        train_cfg = spec.get("train", {})
        src = data or (Path(spec["data"]) if spec.get("data") else None)
        if src is None:
            fail("--data is required for a weights file without a run folder")
            return
        ds = load_defect_dataset(
            src, split, dataset_kind or ("auto" if data else spec.get("dataset_kind", "auto")),
            img_size=tuple(spec["img_size"]), channels=int(spec.get("channels", spec["model"]["in_channels"])),
            skip_bad=skip_bad, dagm_class=dagm_class if dagm_class is not None else train_cfg.get("dagm_class"),
            fold=fold if fold is not None else int(train_cfg.get("fold", 0) or 0),
        )
        res = evaluate_segdec(model, ds, batch=batch, seg_threshold=seg_threshold, progress=True)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        fail(str(e))
        return
    if out is None:
        out = weights / "eval" if weights.is_dir() and (weights / "segdec.json").is_file() else Path("runs/defect/eval")
    files = save_eval_outputs(res, ds, out, max_images=max_images)
    _print_metrics(res)
    if ds.bad:
        typer.echo(f"skipped {len(ds.bad)} bad samples")
    typer.echo(json.dumps({"out": str(out), **files}))


@app.command("predict")
def predict(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint folder or weights file."),
    source: Path = typer.Option(..., "--source", help="Image file or folder (searched recursively)."),
    out: Path = typer.Option(Path("runs/defect/predict"), "--out", help="Output folder."),
    threshold: float | None = typer.Option(None, "--conf", "--threshold",
                                              help="Decision threshold (default: the run's best-F1 threshold, else 0.5)."),
    seg_threshold: float = typer.Option(0.5, "--seg-threshold", help="Pixel threshold of the mask PNGs."),
    batch: int = opt.batch_option(4, "Images per forward pass."),
    no_heatmaps: bool = typer.Option(False, "--no-heatmaps", help="Skip the heatmap overlays."),
    heatmap: HeatmapKind = typer.Option(HeatmapKind.auto, "--heatmap", help="auto (Grad-CAM of the decision for "
                                        "labels-only runs, else the segmentation map) | segmentation | cam."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (listed in predictions.json)."),
    device: str | None = opt.device_option(),
) -> None:
    """Per image: defect probability (predictions.csv), full-resolution mask PNG and heatmap overlay."""
    from .predict import predict_segdec

    try:
        if weights.suffix.lower() == ".onnx":  # an exported model: onnxruntime, same outputs
            from .export import predict_segdec_onnx

            providers = ["CPUExecutionProvider"] if opt.resolve_device(device) == "cpu" else None
            if heatmap == HeatmapKind.cam:
                usage_error("--heatmap cam needs the PyTorch weights (gradients); an .onnx file writes the "
                            "segmentation map")
            results = predict_segdec_onnx(weights, source, out, threshold=threshold, seg_threshold=seg_threshold,
                                          batch=batch, heatmaps=not no_heatmaps, skip_bad=skip_bad,
                                          providers=providers)
        else:
            results = predict_segdec(weights, source, out, threshold=threshold, seg_threshold=seg_threshold,
                                     batch=batch, device=opt.resolve_device(device), heatmaps=not no_heatmaps,
                                     skip_bad=skip_bad, heatmap=heatmap.value)
    except ImportError as e:
        usage_error(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
        return
    n_def = sum(r["defective"] for r in results)
    typer.echo(f"{len(results)} images, {n_def} defective; written to {out}")


@app.command("export")
def export(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint folder or weights file."),
    out: Path | None = typer.Option(None, "--out", help="Output .onnx or .pt2 (default: RUN/model.onnx)."),
    dynamic: bool = typer.Option(True, "--dynamic/--static", help="Dynamic batch (default) or a fixed batch of 1."),
    half: bool = typer.Option(False, "--half", help="fp16 weights and compute (for the CUDA provider / TensorRT)."),
    opset: int = typer.Option(18, "--opset", min=17, help="ONNX opset."),
    simplify: bool = typer.Option(False, "--simplify", help="Simplify the graph (needs onnxslim or onnxsim)."),
) -> None:
    """Export a trained SegDecNet to ONNX (input [B, C, H, W] in 0..1 at the run's size; decision and segmentation
    logits out; size, channels and the run's decision threshold in the metadata) or .pt2."""
    from .export import export_segdec

    target = out or ((weights if weights.is_dir() else weights.parent) / "model.onnx")
    if target.suffix.lower() not in (".onnx", ".pt2"):
        usage_error(f"--out {target}: use a .onnx or .pt2 file name")
    try:
        path = export_segdec(weights, target, dynamic=dynamic, half=half, opset=opset, simplify=simplify)
    except ImportError as e:
        usage_error(str(e))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    typer.echo(f"exported -> {path} ({path.stat().st_size / 2**20:.1f} MB)")
