"""``negvision detect`` (train / eval / predict) and ``negvision demo``."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer

from vision import cli_options as opt
from vision.cli_common import fail, interrupted, parse_pretrained, usage_error

detect_app = typer.Typer(help="ATSS object detectors on COCO / YOLO / VOC image folders.", no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False)
demo_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)




def _augment(hflip: float, scale: str, color_jitter: float) -> dict:
    if scale.lower() == "none":
        rng = None
    else:
        try:
            lo, hi = (float(v) for v in scale.split(","))
        except ValueError:
            usage_error(f"--scale must be LO,HI (e.g. 0.5,1.5) or none, got '{scale}'")
        rng = (lo, hi)
    return {"hflip": hflip, "scale": rng, "color_jitter": color_jitter}


def _multiple_of_32(value: int) -> int:
    if value % 32:
        raise typer.BadParameter(f"{value} is not a multiple of 32 (the head's GroupNorm has 32 groups); "
                                 f"try {max(32, value // 32 * 32)} or {(value // 32 + 1) * 32}")
    return value


# the detectors of the registry (detectors.zoo imports every one), read when needed: a new detector needs no edit here
MODEL = opt.RegistryChoice("--model", "detectors.zoo:DETECTORS", "detector (torchvision's fcos / retinanet: "
                           "the same backbone + FPN)")


@detect_app.command("train", cls=opt.registry_command(model=MODEL))
@opt.resumable
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="COCO json/folder, YOLO data.yaml/folder, Pascal VOC or LabelMe "
                              "folder."),
    out: Path = opt.out_option(Path("runs/detect/exp")),
    model: str = MODEL.option("atss"),
    backbone: str = typer.Option("efficientnet_lite0.offline", "--backbone", help="Registry or timm model name."),
    pretrained: str = typer.Option("true", "--pretrained", help="true | false | PATH to backbone weights."),
    img_size: int = typer.Option(512, "--img-size", min=32, help="Longest image side after resizing."),
    epochs: int = typer.Option(12, "--epochs", min=1),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    batch: int = opt.batch_option(8),
    lr: float = typer.Option(0.01, "--lr"),
    optimizer: opt.Optimizer = typer.Option(opt.Optimizer.sgd, "--optimizer"),
    scheduler: opt.Scheduler = typer.Option(opt.Scheduler.cosine, "--scheduler",
                                            help="cosine | step (x0.1 at 67% and 89%) | constant"),
    warmup: int = typer.Option(100, "--warmup", min=0, help="Linear warmup steps."),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help="Max gradient norm."),
    workers: int = opt.workers_option(2),
    device: str | None = opt.device_option(),
    cpu: bool = opt.cpu_option(),
    amp: opt.Amp = opt.amp_option(),
    resume: str | None = opt.resume_option(),
    exist_ok: bool = opt.exist_ok_option(),
    keep_last: int = opt.keep_last_option(),
    checkpoint_every: int = opt.checkpoint_every_option(),
    deterministic: bool = opt.deterministic_option(),
    skip_bad: bool = opt.skip_bad_option(),
    no_augment: bool = typer.Option(False, "--no-augment", help="Disable flip / scale jitter / colour jitter."),
    hflip: float = typer.Option(0.5, "--hflip", min=0.0, max=1.0, help="Horizontal flip probability."),
    scale: str = typer.Option("0.5,1.5", "--scale", help="Scale jitter range LO,HI (then crop/pad to img-size); 'none'."),
    color_jitter: float = typer.Option(0.2, "--color-jitter", min=0.0, help="Brightness/contrast/saturation jitter."),
    fpn_channels: int = typer.Option(256, "--fpn-channels", min=32, callback=_multiple_of_32,
                                     help="FPN / head width: a multiple of 32 (the head's GroupNorm groups)."),
    seed: int = opt.seed_option(),
    config: Path | None = opt.config_option(),
) -> None:
    """Train a detector (multi-GPU: `accelerate launch $(which negvision) detect train ...`)."""
    from detectors.detect import DetectConfig, train_detector
    from vision.data import DatasetError
    from vision.engine import TrainConfig, TrainingInterrupted, WeightsMismatchError

    config = DetectConfig(model=model, backbone=backbone, pretrained=parse_pretrained(pretrained), img_size=img_size,
                          augment=False if no_augment else _augment(hflip, scale, color_jitter),
                          model_kwargs={"fpn_channels": fpn_channels})
    train = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer.value, scheduler=scheduler.value,
                        warmup_steps=warmup, clip_grad_norm=clip_grad, max_steps=max_steps, mixed_precision=amp.value,
                        seed=seed, checkpoint_every=checkpoint_every, deterministic=deterministic)
    try:
        summary = train_detector(data, config, train, opt.run_options(ctx))
    except TrainingInterrupted as e:
        interrupted(f"{e} (negvision detect train ... --resume)")
    except (DatasetError, FileNotFoundError, ValueError, WeightsMismatchError) as e:
        fail(str(e))
    ev = summary.get("eval")
    if ev:
        typer.echo(f"AP {ev['AP']:.4f}  AP50 {ev['AP50']:.4f}  AP75 {ev['AP75']:.4f}")
    n_skipped = sum(summary.get("skipped", {}).values())
    if n_skipped:
        typer.echo(f"skipped {n_skipped} bad items: listed in {Path(summary['out']) / 'skipped.txt'}")
    typer.echo(f"run folder: {summary['out']}")


@detect_app.command("eval")
def evaluate(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint folder or model.safetensors."),
    data: Path = typer.Option(..., "--data"),
    split: str = typer.Option("val", "--split"),
    batch: int = opt.batch_option(8, "Images per forward pass."),
    out: Path | None = typer.Option(None, "--out", "--out-dir", help="Write metrics.json, PR / F1 curves, confusion "
                                    "matrix, prediction grid here."),
    skip_bad: bool = opt.skip_bad_option("Skip bad images/labels (counted)."),
    device: str | None = opt.device_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    label_issues: bool = typer.Option(False, "--label-issues", help="Also rank the images of every split most "
                                      "likely mislabelled (missing box, wrong class, badly placed box; cleanlab): "
                                      "OUT/label_issues/ (default RUN/label_issues/): JSON, CSV, pictures."),
    folds: int = typer.Option(0, "--folds", min=0, help="With --label-issues: predict the training images with K "
                              "models cross-fitted on the other folds (K trainings of the run's settings); 0: the "
                              "given model, which saw them."),
    top: int = typer.Option(20, "--top", min=0, help="With --label-issues: pictures (label | prediction) of the N "
                            "lowest-ranked images, and the lines printed."),
) -> None:
    """COCO AP / AP50 / AP75 / AP small-medium-large and a per-class AP table (pycocotools); with --label-issues,
    the images most likely mislabelled, ranked by cleanlab's label quality."""
    from detectors.detect import evaluate_detector, load_detector, save_eval_outputs
    from vision.data import DatasetError, load_detection_dataset
    from vision.engine import WeightsMismatchError
    from vision.metrics import format_ap_table

    if folds == 1:
        usage_error("--folds 1 cannot hold an image out: use 0 (the given model) or K >= 2")
    if folds and not label_issues:
        usage_error("--folds goes with --label-issues")
    dev = opt.resolve_device(device)
    try:
        model, spec = load_detector(weights, dev)
        ds = load_detection_dataset(data, split, skip_bad=skip_bad)
    except (DatasetError, FileNotFoundError, ValueError, WeightsMismatchError) as e:
        fail(str(e))
    if list(ds.classes) != list(spec["classes"]):
        fail(f"classes of {data} {ds.classes} differ from the model's {spec['classes']}")
    res, preds = evaluate_detector(model, ds, batch_size=batch, progress=True)
    if out is not None:
        save_eval_outputs(res, preds, ds, out)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in res.items() if k != "pr_curves"}, default=float))
    else:
        typer.echo(format_ap_table(res))
    if label_issues:
        del model
        _label_issues(weights, data, out, folds=folds, top=top, batch=batch, device=dev, skip_bad=skip_bad,
                      quiet=as_json)


def _label_issues(weights: Path, data: Path, out: Path | None, *, folds: int, top: int, batch: int,
                  device: str | None, skip_bad: bool, quiet: bool) -> None:
    """``detect eval --label-issues``: rank every split, write OUT/label_issues/, print the sources and the top."""
    from detectors.label_issues import OUT_NAME, LabelIssueConfig, cost_line, describe, rank_label_issues
    from vision.data import DatasetError
    from vision.engine import TrainingInterrupted, WeightsMismatchError
    from vision.engine.run import find_spec

    if out is None:
        spec_path = find_spec(weights, "detector.json")
        out = spec_path.parent if spec_path is not None else (weights if weights.is_dir() else weights.parent)
    folder = out / OUT_NAME
    config = LabelIssueConfig(folds=folds, top=top, batch_size=batch, device=device, skip_bad=skip_bad)
    try:
        res = rank_label_issues(data, weights, folder, config)
    except TrainingInterrupted as e:
        interrupted(f"{e} (a fold training was interrupted; run the command again)")
    except (DatasetError, OSError, ValueError, WeightsMismatchError) as e:
        fail(str(e))
    echo = (lambda s: typer.echo(s, err=True)) if quiet else typer.echo  # --json keeps stdout one JSON line
    summ = res.summary()
    echo(f"label issues: {summ['flagged']} of {summ['images']} images flagged by cleanlab (find_label_issues)")
    for s, how in res.sources.items():
        echo(f"  {s}: predicted by {how}")
    if folds >= 2:
        n_train = summ["by_split"].get("train", {}).get("images", 0)
        echo(f"  cost: {cost_line(folds, n_train)}; {res.seconds.get('cross_fit', 0):.0f} s")
    for r in res.rows[:top]:
        flag = "*" if r["issue"] else " "
        echo(f"{r['rank']:>4}{flag} {r['score']:.3f}  [{r['split']}] {Path(r['file']).name}  {describe(r)}")
    echo(f"ranked list: {folder / 'label_issues.csv'} (and .json); pictures: {folder / 'pictures'}")


@detect_app.command("predict")
def predict(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint, model.safetensors or an exported "
                                 ".onnx file."),
    source: Path = typer.Option(..., "--source", help="An image, a folder of images (recursive), or a .txt list of "
                                "image paths (one a line)."),
    out: Path = opt.out_option(Path("runs/detect/predict"), "Output folder."),
    conf: float = typer.Option(0.3, "--conf", "--threshold", min=0.0, max=1.0, help="Minimum score to keep and draw."),
    batch: int = opt.batch_option(4, "Images per forward pass."),
    device: str | None = opt.device_option(),
    no_draw: bool = typer.Option(False, "--no-draw", help="Only write the JSON files."),
    skip_bad: bool = opt.skip_bad_option("Skip unreadable images (listed in OUT/skipped.txt)."),
) -> None:
    """One JSON per image (boxes, scores, labels, class names) and the image with boxes drawn; outputs mirror the
    source's sub-folders and never overwrite each other. ``--weights model.onnx`` runs an exported model with
    onnxruntime (CUDA provider when present)."""
    from detectors.detect import predict_images
    from vision.engine import WeightsMismatchError

    dev = opt.resolve_device(device)
    try:
        if weights.suffix.lower() == ".onnx":  # an exported model: onnxruntime, same outputs
            from detectors.atss.export import predict_images_onnx

            providers = ["CPUExecutionProvider"] if dev == "cpu" else None
            res = predict_images_onnx(weights, source, out, score_thresh=conf, batch=batch, draw=not no_draw,
                                      skip_bad=skip_bad, providers=providers)
        else:
            res = predict_images(weights, source, out, score_thresh=conf, batch=batch, device=dev, draw=not no_draw,
                                 skip_bad=skip_bad)
    except ImportError as e:
        usage_error(str(e))
    except (FileNotFoundError, ValueError, WeightsMismatchError) as e:
        fail(str(e))
    n = sum(len(r["detections"]) for r in res)
    typer.echo(f"{len(res)} images, {n} detections -> {out}")


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    pt2 = "pt2"


@detect_app.command("export")
def export(
    weights: Path = typer.Option(..., "--weights", help="Run folder, checkpoint folder or model.safetensors."),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="onnx (onnxruntime, TensorRT...) | pt2 "
                                     "(torch.export program)."),
    out: Path | None = typer.Option(None, "--out", help="Output file (default: RUN/model.onnx or model.pt2)."),
    img_size: int | None = typer.Option(None, "--img-size", min=32, help="Input size (default: the trained one)."),
    dynamic: bool = typer.Option(True, "--dynamic/--static", help="Dynamic batch and input size (default) or a "
                                 "fixed img-size square input."),
    half: bool = typer.Option(False, "--half", help="fp16 weights and compute (for the CUDA provider / TensorRT)."),
    opset: int = typer.Option(18, "--opset", min=17, help="ONNX opset."),
    no_nms: bool = typer.Option(False, "--no-nms", help="Raw per-level outputs (and anchors) instead of detections "
                                "after NMS."),
    simplify: bool = typer.Option(False, "--simplify", help="Simplify the graph (needs onnxslim or onnxsim)."),
) -> None:
    """Export a trained detector: ONNX (the graph takes the normalised, resized, padded batch and returns boxes,
    scores, labels after NMS; class names, input size and normalisation in the file's metadata) or .pt2."""
    from detectors.atss.export import export_detector

    target = out or ((weights if weights.is_dir() else weights.parent) / f"model.{fmt.value}")
    if target.suffix.lower() != f".{fmt.value}":
        usage_error(f"--out {target}: the file name must end in .{fmt.value} for --format {fmt.value}")
    try:
        path = export_detector(weights, target, img_size=img_size, dynamic=dynamic, half=half, opset=opset,
                               nms=not no_nms, simplify=simplify)
    except ImportError as e:
        usage_error(str(e))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    typer.echo(f"exported -> {path} ({path.stat().st_size / 2**20:.1f} MB)")


@demo_app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the data, run and predictions go."),
    n_train: int = typer.Option(400, "--n-train"),
    n_val: int = typer.Option(100, "--n-val"),
    img_size: int = typer.Option(256, "--img-size"),
    batch: int = typer.Option(8, "--batch"),
    epochs: int = typer.Option(6, "--epochs", help="Sized to finish within 10 minutes on 2 CPU cores."),
    workers: int = typer.Option(1, "--workers"),
) -> None:
    """The main job: make a digits set, train ATSS (EfficientNet-Lite0, ImageNet weights), evaluate, predict."""
    from detectors.demo import run_demo

    try:
        run_demo(out=out, n_train=n_train, n_val=n_val, img_size=img_size, batch=batch,
                 epochs=epochs, workers=workers)
    except KeyboardInterrupt:
        interrupted("interrupted")


__all__ = ["detect_app", "demo_app"]
