"""Detector tasks on image folders: train (shared engine), evaluate (COCOeval), predict (JSON + pictures)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision.device import pick_device
from vision.engine.config import RunOptions, TrainConfig
from vision.io import list_images, write_json_atomic

log = logging.getLogger(__name__)

DETECTOR_JSON = "detector.json"
DEFAULT_WEIGHTS = "best"  # a detector run's model is its best validation checkpoint (else the last one)


# ----------------------------------------------------------------------------- model files
def model_spec(model: str, num_classes: int, classes: Sequence[str], backbone: str, pretrained: bool | str,
               img_size: int, freeze_bn: bool | None = None, **model_kwargs: Any) -> dict[str, Any]:
    """The JSON that rebuilds a trained detector: registry name, constructor kwargs, class names."""
    freeze = bool(pretrained) if freeze_bn is None else bool(freeze_bn)
    kwargs = dict(backbone=backbone, min_size=img_size, max_size=img_size, freeze_bn=freeze, **model_kwargs)
    return {"model": model, "num_classes": num_classes, "classes": list(classes), "kwargs": kwargs,
            "pretrained_backbone": pretrained if isinstance(pretrained, bool) else str(pretrained),
            "weights": DEFAULT_WEIGHTS}


def build_from_spec(spec: dict[str, Any], pretrained_backbone: bool | str = False) -> nn.Module:
    """Instantiate the detector described by ``spec`` (weights loaded separately)."""
    from detectors.zoo import create_detector

    return create_detector(spec["model"], spec["num_classes"], pretrained_backbone=pretrained_backbone, **spec["kwargs"])


def find_weights_file(path: str | Path) -> Path:
    """The model.safetensors of a run folder (the run's best checkpoint, else last), checkpoint folder or file."""
    from vision.engine.run import run_weights

    return run_weights(path, DETECTOR_JSON, DEFAULT_WEIGHTS, "detector")[0]


def load_detector(weights: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained detector (eval mode) and its spec from a run folder, checkpoint folder or weights file."""
    from vision.engine import load_model_weights
    from vision.engine.run import read_spec, run_weights

    wfile, spec_path = run_weights(weights, DETECTOR_JSON, DEFAULT_WEIGHTS, "detector")
    if spec_path is None:
        raise FileNotFoundError(f"no {DETECTOR_JSON} found next to or above '{wfile}'; pass a run folder made by "
                                "'negvision detect train' or a checkpoint inside one")
    spec = read_spec(spec_path)
    model = build_from_spec(spec)
    load_model_weights(model, wfile)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return model.to(dev).eval(), spec


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def run_inference(model: nn.Module, dataset: Any, batch_size: int = 8, device: torch.device | None = None,
                  num_workers: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Detections for every image of ``dataset`` (per image: image_id, boxes, scores, labels on the CPU)."""
    from torch.utils.data import DataLoader

    from vision.data import detection_collate

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=detection_collate)
    preds: list[dict[str, Any]] = []
    it: Iterable = loader
    if progress:
        from vision.progress import track

        it = track(loader, desc="eval", unit="batch")
    for images, targets in it:
        out = model([im.to(device) for im in images])
        for o, t in zip(out, targets, strict=True):
            preds.append({"image_id": int(t["image_id"]), **{k: v.detach().float().cpu() if k != "labels" else v.cpu()
                                                              for k, v in o.items()}})
    model.train(was_training)
    return preds


def evaluate_detector(model: nn.Module, dataset: Any, batch_size: int = 8, device: torch.device | None = None,
                      num_workers: int = 0, progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCOeval (pycocotools) of ``model`` on ``dataset``: AP, AP50, AP75, APs/m/l, per-class AP, PR curves."""
    from vision.metrics import coco_evaluate

    t0 = time.perf_counter()
    preds = run_inference(model, dataset, batch_size, device, num_workers, progress)
    dt = time.perf_counter() - t0
    result = coco_evaluate(dataset.to_coco(), preds, class_names=list(dataset.classes))
    result["images_per_s"] = len(dataset) / max(dt, 1e-9)
    return result, preds


def save_eval_outputs(result: dict[str, Any], preds: list[dict[str, Any]], dataset: Any, out: Path,
                      max_images: int = 16, score_thresh: float = 0.25) -> dict[str, str]:
    """Write metrics.json, pr_curves.png, confusion_matrix.png, f1/p/r_curve.png and a grid of validation
    predictions; returns their paths."""
    from vision.viz import draw_boxes, image_grid, plot_pr_curves, save_image

    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in result.items() if k != "pr_curves"}
    write_json_atomic(out / "metrics.json", metrics)
    curves = {name: rp for name, rp in result.get("pr_curves", {}).items()}
    pr_path = plot_pr_curves(curves, out / "pr_curves.png", title=f"PR @ IoU 0.5 (AP50 {result['AP50']:.3f})")
    tiles, titles = [], []
    for p in preds[:max_images]:
        img, _ = dataset[p["image_id"]]
        keep = p["scores"] >= score_thresh
        tiles.append(draw_boxes(img, p["boxes"][keep], p["labels"][keep], p["scores"][keep], class_names=dataset.classes))
        titles.append(Path(dataset.image_paths[p["image_id"]]).name)
    grid_path = save_image(image_grid(tiles, titles=titles), out / "val_predictions.jpg") if tiles else None
    from detectors.plots import save_detection_plots

    plots = save_detection_plots(dataset, preds, out, list(dataset.classes))  # confusion matrix, F1 / P / R curves
    return {"metrics": str(out / "metrics.json"), "pr_curves": str(pr_path), "predictions": str(grid_path), **plots}


# ----------------------------------------------------------------------------- training
@dataclass
class DetectConfig:
    """What a detector learns: the registry ``model`` on a ``backbone`` (``pretrained``: True, False or a weights
    file) at ``img_size`` (the longer side, letterboxed), with ``augment`` (True, False, or a dict of
    :func:`vision.data.build_detection_transforms` arguments), validated on the ``val_split`` split;
    ``model_kwargs`` go to the detector's constructor."""

    model: str = "atss"
    backbone: str = "efficientnet_lite0.offline"
    pretrained: bool | str = True
    img_size: int = 512
    augment: bool | dict[str, Any] = True
    val_split: str = "val"
    model_kwargs: dict[str, Any] | None = None


# The detector's schedule where the TrainConfig leaves it unset (mmdetection's 1x habit, shortened warmup).
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 12, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
                                  "weight_decay": 1e-4, "scheduler": "cosine", "warmup_steps": 100, "batch_size": 8}


def train_detector(data: str | Path, config: DetectConfig | None = None, train: TrainConfig | None = None,
                   run: RunOptions | None = None) -> dict[str, Any]:
    """Train a detector on a COCO / YOLO / VOC / LabelMe folder through the shared engine; writes the run folder.

    Both splits go through the same validation pass: a bad item in either stops with an error listing the
    problems (or is skipped with ``skip_bad`` and listed in ``skipped.txt``); only an absent val split trains
    without validation. ``config`` (:class:`DetectConfig`): the model and data settings; ``train``
    (:class:`TrainConfig`): the schedule, unset fields from :data:`TRAIN_DEFAULTS`; ``run`` (:class:`RunOptions`):
    a new run into a used ``run.out`` goes to ``out2``, ``out3``... unless ``resume`` or ``exist_ok`` (reuse,
    clearing the old logs); ``summary["out"]`` is the folder used. ``run.config`` (the command's resolved options)
    is written to ``config.yaml`` there, so ``--config OUT/config.yaml`` replays the run; ``run.device``: ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``.
    """
    from vision.data import (
        DatasetError,
        SplitNotFoundError,
        build_detection_transforms,
        detection_collate,
        load_detection_dataset,
    )
    from vision.data.formats import combine_errors
    from vision.device import training_device
    from vision.engine import LossContext, Trainer
    from vision.engine.run import main_process_first, prepare_run_dir, record_skipped, write_run_config

    cfg, run = config or DetectConfig(), run or RunOptions()
    train = (train or TrainConfig()).resolved(**TRAIN_DEFAULTS)
    seed, val_split, skip_bad, progress, resume = train.seed, cfg.val_split, run.skip_bad, run.progress, run.resume
    aug = dict(cfg.augment) if isinstance(cfg.augment, dict) else {}
    tf = build_detection_transforms(True, img_size=cfg.img_size, **aug) if cfg.augment else None
    errors: list[tuple[str, DatasetError]] = []  # both splits are checked before any error is raised
    with main_process_first():  # one rank decodes every image, the others read its cache
        try:
            train_ds = load_detection_dataset(data, "train", transforms=tf, skip_bad=skip_bad, progress=progress)
        except SplitNotFoundError:
            raise
        except DatasetError as e:
            if e.kind == "dataset":
                raise
            errors.append(("train", e))
        try:
            val_ds = load_detection_dataset(data, val_split, skip_bad=skip_bad, progress=progress)
        except SplitNotFoundError as e:  # only an absent split trains without periodic evaluation
            log.warning("%s; training without validation", e)
            val_ds = None
        except DatasetError as e:
            errors.append((val_split, e))
    if errors:
        raise combine_errors(errors)
    train_ds.augment_seed = seed  # augmentation draws from (seed, epoch, index): any worker count, exact resume
    if val_ds is not None and list(val_ds.classes) != list(train_ds.classes):
        raise ValueError(f"class lists differ between train {train_ds.classes} and {val_split} {val_ds.classes} in "
                         f"{data} (COCO: the two annotation files declare different categories)")
    out = prepare_run_dir(run.out, resume=resume, exist_ok=run.exist_ok)
    if run.config is not None:
        write_run_config(out, {**run.config, "_resumed": bool(resume)})
    device = "cpu" if training_device(run.device) else run.device
    record_skipped(out, {"train": train_ds.bad, **({val_split: val_ds.bad} if val_ds is not None else {})})
    classes = list(train_ds.classes)
    pretrained = cfg.pretrained
    spec = model_spec(cfg.model, len(classes), classes, cfg.backbone, pretrained, cfg.img_size,
                      **(cfg.model_kwargs or {}))
    resuming = bool(resume)
    if resuming and (out / DETECTOR_JSON).is_file():
        from vision.engine.run import read_spec

        old = read_spec(out / DETECTOR_JSON)
        if old.get("classes") != spec["classes"] or old.get("model") != spec["model"]:
            raise ValueError(f"cannot resume {out}: it was trained with model {old.get('model')} / classes "
                             f"{old.get('classes')}, now {spec['model']} / {spec['classes']}")
        spec = old
    from vision.seeding import seed_everything

    seed_everything(seed)  # the initial weights (FPN, head, an unpretrained trunk) depend on the seed only
    net = build_from_spec(spec, pretrained_backbone=pretrained if not resuming else False)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / DETECTOR_JSON, spec)

    def loss_fn(m: nn.Module, b: Any) -> dict[str, torch.Tensor]:
        images, targets = b
        losses = m(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return {"loss": sum(losses.values()), **losses}

    # eval results by step, kept for the best step so far and the newest: the final report reuses the best one
    evals: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def eval_fn(m: nn.Module, ctx: LossContext) -> dict[str, float]:
        assert val_ds is not None and ctx.trainer is not None
        res, preds = evaluate_detector(m, val_ds, batch_size=train.batch_size, device=next(m.parameters()).device)
        for step in [k for k in evals if k != ctx.trainer.best_step]:
            del evals[step]
        evals[ctx.step] = (res, preds)
        return {k: float(res[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}

    tcfg = dataclasses.replace(train, **{**run.train_fields(out), "device": device,
                                         "eval_every": train.eval_every if val_ds is not None else 0})
    trainer = Trainer(net, train_ds, tcfg, loss_fn=loss_fn, eval_fn=eval_fn if val_ds is not None else None,
                      metric="AP" if val_ds is not None else None, mode="max", collate_fn=detection_collate, batch_size_fn=lambda b: len(b[0]),
                      extra_config={"task": "detect", "data": str(data), "detector": spec})
    summary = trainer.fit(resume=resume)
    summary["out"] = str(out)
    summary["skipped"] = {"train": len(train_ds.bad), val_split: len(val_ds.bad) if val_ds is not None else 0}
    if not trainer.accelerator.is_main_process:
        return summary
    if val_ds is not None:
        if summary.get("best_step") in evals:  # the best checkpoint was evaluated in this process
            res, preds = evals[summary["best_step"]]
        else:  # e.g. its evaluation happened before a resume
            best = out / "checkpoints" / "best" / "model.safetensors"
            final_model, _ = load_detector(best if best.is_file() else out)
            res, preds = evaluate_detector(final_model, val_ds, batch_size=train.batch_size)
        summary["eval"] = {k: res[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class", "images_per_s")}
        summary["files"] = save_eval_outputs(res, preds, val_ds, out)
    write_json_atomic(out / "train_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- prediction
def write_detections(out: Path, image: Path, stem: Path, picture: Any, width: int, height: int,
                     dets: dict[str, Any], classes: Sequence[str], score_thresh: float, draw: bool) -> dict[str, Any]:
    """One image's ``predict`` outputs: ``OUT/STEM.json`` (detections scoring >= ``score_thresh``) and, with
    ``draw``, ``OUT/STEM.jpg`` with the boxes drawn on ``picture``; returns the JSON record. Shared by the
    PyTorch and the onnxruntime path."""
    from vision.viz import draw_boxes, save_image

    keep = dets["scores"] >= score_thresh
    boxes, scores, labels = dets["boxes"][keep], dets["scores"][keep], dets["labels"][keep]
    rec = {"image": str(image), "width": width, "height": height,
           "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                           "label": int(lab), "class_name": classes[int(lab)]}
                          for b, s, lab in zip(boxes, scores, labels, strict=True)]}
    rec["json"] = str(out / f"{stem}.json")
    write_json_atomic(out / f"{stem}.json", rec)
    if draw:
        rec["picture"] = str(out / f"{stem}.jpg")
        save_image(draw_boxes(picture, boxes, labels, scores, class_names=classes), out / f"{stem}.jpg")
    return rec


@torch.no_grad()
def predict_images(weights: str | Path, source: str | Path | list[Path], out: str | Path, *, score_thresh: float = 0.3,
                   batch: int = 4, device: str | None = None, draw: bool = True,
                   skip_bad: bool = False) -> list[dict[str, Any]]:
    """Run a trained detector on images (EXIF orientation applied); writes one JSON per image and (optionally) the
    image with boxes drawn. Outputs mirror the source's sub-folders and never overwrite each other (``a.jpg`` and
    ``a.png`` give ``a.jpg.json`` and ``a.png.json``). An unreadable image is an error naming it, or with
    ``skip_bad`` is skipped and listed in ``OUT/skipped.txt``."""
    import numpy as np

    from vision.engine.run import write_skipped
    from vision.io import open_image_or_skip, output_names

    model, spec = load_detector(weights, device)
    dev = next(model.parameters()).device
    classes = spec["classes"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in source] if isinstance(source, (list, tuple)) else list_images(source)
    names = output_names(files, None if isinstance(source, (list, tuple)) else source)
    results, skipped = [], []
    for i in range(0, len(files), batch):
        chunk, stems, imgs = [], [], []
        for f, stem in zip(files[i:i + batch], names[i:i + batch], strict=True):
            pil = open_image_or_skip(f, "RGB", skip_bad, skipped)
            if pil is None:
                continue
            arr = np.asarray(pil)
            chunk.append(f)
            stems.append(stem)
            imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255))
        if not chunk:
            continue
        dets = model([im.to(dev) for im in imgs])
        for f, stem, im, d in zip(chunk, stems, imgs, dets, strict=True):
            d = {k: v.cpu() for k, v in d.items()}
            results.append(write_detections(out, f, stem, im, int(im.shape[-1]), int(im.shape[-2]), d, classes,
                                            score_thresh, draw))
    write_skipped(out, {"predict": skipped})
    return results
