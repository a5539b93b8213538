"""SegDecNet tasks: train (shared engine), evaluate (image- and pixel-level metrics), predict (masks, heatmaps).

A run folder holds ``segdec.json`` (what rebuilds the network and its input size), the engine's
``checkpoints/last`` (final model, what eval/predict use by default, as the official code) and
``checkpoints/best`` (best validation AP), logs, and ``eval/`` with the final evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vision.device import pick_device
from vision.io import (
    ImageReadError,
    list_images,
    open_image,
    output_names,
    write_bytes_atomic,
    write_json_atomic,
)

from .data import DefectDataset, load_defect_dataset, parse_img_size
from .losses import loss_weights, segdec_loss
from .model import SegDecNet
from .sampler import FrequencySampler

__all__ = [
    "PRESETS",
    "SPEC_FILE",
    "build_from_spec",
    "evaluate_segdec",
    "find_weights_file",
    "image_metrics",
    "load_segdec",
    "predict_segdec",
    "resolve_settings",
    "run_inference",
    "save_eval_outputs",
    "train_segdec",
]

log = logging.getLogger(__name__)

SPEC_FILE = "segdec.json"
SAMPLER_FILE = "sampler.safetensors"

# Official experiment settings (vicoslab/mixed-segdec-net-comind2021, EXPERIMENTS_COMIND.sh / config.py).
# img_size is WIDTHxHEIGHT. Plain SGD (no momentum, no weight decay, constant lr) as the official code.
# Severstal: the official code sums per-sample losses over its batch of 10 at lr 0.1; our loss is the batch
# mean, so the same update needs lr 1.0.
PRESETS: dict[str, dict[str, Any]] = {
    "dagm": dict(img_size="512x512", channels=1, epochs=70, lr=0.05, delta=1.0, batch=1, p=1.0, w_pos=10.0,
                 dilate=7),
    "ksdd": dict(img_size="512x1408", channels=1, epochs=50, lr=1.0, delta=0.01, batch=1, p=2.0, w_pos=1.0,
                 dilate=7),
    "ksdd2": dict(img_size="232x640", channels=3, epochs=50, lr=0.01, delta=1.0, batch=1, p=2.0, w_pos=3.0,
                  dilate=15),
    "severstal": dict(img_size="1600x256", channels=1, epochs=50, lr=1.0, delta=0.1, batch=10, p=2.0, w_pos=1.0,
                      dilate=1),
    # generic folders: DAGM's loss settings, the images' own size and channels, no mask dilation
    "folder": dict(img_size=None, channels=None, epochs=50, lr=0.05, delta=1.0, batch=1, p=1.0, w_pos=10.0,
                   dilate=1),
}
EVAL_EVERY = 5  # official VALIDATION_N_EPOCHS


def resolve_settings(layout: str, **overrides: Any) -> dict[str, Any]:
    """The preset of ``layout`` with every non-None override applied."""
    if layout not in PRESETS:
        raise ValueError(f"no preset for dataset kind '{layout}' (known: {', '.join(PRESETS)})")
    s = dict(PRESETS[layout])
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


# ----------------------------------------------------------------------------------------------- model files


def build_from_spec(spec: dict[str, Any], pretrained_backbone: bool | str = False) -> SegDecNet:
    """The (untrained) network described by a ``segdec.json`` spec."""
    m = dict(spec["model"])
    return SegDecNet(
        in_channels=int(m.get("in_channels", 1)),
        grad_multiplier=float(m.get("grad_multiplier", 0.0)),
        backbone=m.get("backbone"),
        pretrained=pretrained_backbone,
        width=float(m.get("width", 1.0)),
    )


def _find_spec(path: Path) -> Path | None:
    start = path if path.is_dir() else path.parent
    for p in [start, *start.parents][:4]:
        if (p / SPEC_FILE).is_file():
            return p / SPEC_FILE
    return None


def find_weights_file(path: str | Path) -> Path:
    """The weights of a run folder (final model: checkpoints/last, else best), checkpoint folder or file."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (p / "checkpoints" / "last" / "model.safetensors", p / "checkpoints" / "best" / "model.safetensors",
                 p / "model.safetensors"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"no SegDecNet weights at '{p}' (looked for checkpoints/last|best/model.safetensors and model.safetensors); "
        "pass a run folder made by 'negvision defect train', a checkpoint folder or a weights file"
    )


def load_segdec(
    weights: str | Path,
    device: str | torch.device | None = None,
    *,
    img_size: Any = None,
    channels: int | None = None,
) -> tuple[SegDecNet, dict[str, Any]]:
    """A trained SegDecNet (eval mode) and its spec, from a run folder, checkpoint folder or weights file.

    A bare weights file without ``segdec.json`` (e.g. an official ``.pth``) needs ``img_size`` and ``channels``.
    """
    from vision.engine import load_model_weights

    wfile = find_weights_file(weights)
    spec_path = _find_spec(wfile)
    if spec_path is not None:
        spec = json.loads(spec_path.read_text())
        if img_size is not None:
            spec["img_size"] = list(parse_img_size(img_size))  # type: ignore[arg-type]
    else:
        if img_size is None or channels is None:
            raise FileNotFoundError(
                f"no {SPEC_FILE} next to or above '{wfile}'; pass a run folder made by 'negvision defect train', "
                "or give img_size and channels to use a bare weights file with the paper's network"
            )
        spec = {"model": {"in_channels": channels}, "img_size": list(parse_img_size(img_size)),  # type: ignore[arg-type]
                "channels": channels}
    model = build_from_spec(spec)
    load_model_weights(model, wfile)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return model.to(dev).eval(), spec


# ----------------------------------------------------------------------------------------------- metrics


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Image-level metrics of defect probabilities: AP, AUROC, and at the best-F1 threshold FP, FN, detection
    rate (recall), accuracy; FP at FN = 0 (threshold at the lowest-scored defective image); PR/ROC curves."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        raise ValueError("image_metrics: no samples")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    out: dict[str, Any] = {"n_images": int(y.size), "n_defective": n_pos, "n_defect_free": n_neg}
    both = n_pos > 0 and n_neg > 0
    out["AP"] = float(average_precision_score(y, s)) if n_pos > 0 else float("nan")
    out["AUROC"] = float(roc_auc_score(y, s)) if both else float("nan")
    if n_pos > 0:
        precision, recall, thr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        ix = int(np.argmax(f1))
        threshold, best_f1 = float(thr[ix]), float(f1[ix])
        out["pr_curve"] = {"precision": precision.tolist(), "recall": recall.tolist()}
    else:
        threshold, best_f1 = 0.5, float("nan")
    decision = s >= threshold
    tp = int((decision & (y == 1)).sum())
    fp = int((decision & (y == 0)).sum())
    fn = int((~decision & (y == 1)).sum())
    tn = int((~decision & (y == 0)).sum())
    out.update(threshold=threshold, F1=best_f1, TP=tp, FP=fp, FN=fn, TN=tn,
               detection_rate=tp / n_pos if n_pos else float("nan"), accuracy=(tp + tn) / y.size)
    # FP at FN = 0: the highest threshold that still finds every defective image
    out["FP_at_FN0"] = int((s[y == 0] >= s[y == 1].min()).sum()) if n_pos else 0
    if both:
        fpr, tpr, _ = roc_curve(y, s)
        out["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def _dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, gt).sum())
    ps, gs = float(pred.sum()), float(gt.sum())
    if ps + gs == 0:
        return 1.0, 1.0  # both empty: perfect
    return 2 * inter / (ps + gs), inter / (ps + gs - inter)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def run_inference(
    model: nn.Module, dataset: DefectDataset, batch: int = 8, device: torch.device | None = None,
    num_workers: int = 0, progress: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Defect probabilities [N] and segmentation probabilities (1/8 resolution, float32) of every image."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=num_workers)
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="eval", leave=False)
    scores: list[float] = []
    segs: list[np.ndarray] = []
    try:
        for b in it:
            dec, seg = model(b["image"].to(device))
            scores.extend(torch.sigmoid(dec.float()).cpu().tolist())
            segs.extend(torch.sigmoid(seg.float())[:, 0].cpu().numpy())
    finally:
        model.train(was_training)
    return np.asarray(scores, dtype=np.float64), segs


def _upsample(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def evaluate_segdec(
    model: nn.Module,
    dataset: DefectDataset,
    *,
    batch: int = 8,
    device: torch.device | None = None,
    seg_threshold: float = 0.5,
    pixel: bool = True,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Image-level metrics (:func:`image_metrics`) and, with ``pixel``, Dice / IoU of the segmentation upsampled to
    each image's full resolution and thresholded at ``seg_threshold`` (mean over defective images with masks;
    ``dice_all`` / ``iou_all`` over every image with known ground truth). Adds ``per_image`` rows."""
    t0 = time.perf_counter()
    scores, segs = run_inference(model, dataset, batch, device, num_workers, progress)
    dt = time.perf_counter() - t0
    labels = np.asarray(dataset.labels)
    res = image_metrics(labels, scores)
    res["images_per_s"] = len(dataset) / max(dt, 1e-9)
    rows = []
    dice_pos, iou_pos, dice_all, iou_all = [], [], [], []
    for i, s in enumerate(dataset.samples):
        row: dict[str, Any] = {"name": s.name, "image": str(s.image), "label": int(s.label),
                               "score": float(scores[i]), "decision": int(scores[i] >= res["threshold"]),
                               "dice": "", "iou": ""}
        if pixel:
            gt = dataset.full_mask(i)
            if gt is not None:
                pred = _upsample(segs[i], gt.shape) >= seg_threshold
                d, j = _dice_iou(pred, gt)
                row["dice"], row["iou"] = round(d, 6), round(j, 6)
                dice_all.append(d)
                iou_all.append(j)
                if s.label == 1:
                    dice_pos.append(d)
                    iou_pos.append(j)
        rows.append(row)
    if pixel:
        nan = float("nan")
        res.update(
            dice=float(np.mean(dice_pos)) if dice_pos else nan,
            iou=float(np.mean(iou_pos)) if iou_pos else nan,
            dice_all=float(np.mean(dice_all)) if dice_all else nan,
            iou_all=float(np.mean(iou_all)) if iou_all else nan,
            seg_threshold=seg_threshold,
        )
    res["per_image"] = rows
    res["_segs"] = segs
    return res


def _interp_pr(precision: Sequence[float], recall: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Precision interpolated (max to the right) on 101 recall points, for plotting."""
    p, r = np.asarray(precision), np.asarray(recall)
    grid = np.linspace(0, 1, 101)
    out = np.array([p[r >= g].max() if (r >= g).any() else 0.0 for g in grid])
    return grid, out


def save_eval_outputs(res: dict[str, Any], dataset: DefectDataset, out: str | Path, max_images: int = 16) -> dict[str, str]:
    """Write results.csv (per image), metrics.json, pr_curve.png, roc_curve.png and a grid of heatmaps."""
    from vision.viz import image_grid, overlay_heatmap, plot_pr_curves, plot_roc_curve, save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    buf = io.StringIO()
    fields = ["name", "image", "label", "score", "decision", "dice", "iou"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in res["per_image"]:
        w.writerow({k: (f"{r[k]:.6f}" if k == "score" else r[k]) for k in fields})
    write_bytes_atomic(out / "results.csv", buf.getvalue().encode())
    files["results"] = str(out / "results.csv")
    metrics = {k: v for k, v in res.items() if k not in ("per_image", "_segs", "pr_curve", "roc_curve")}
    write_json_atomic(out / "metrics.json", metrics)
    files["metrics"] = str(out / "metrics.json")
    if "pr_curve" in res:
        r, p = _interp_pr(res["pr_curve"]["precision"], res["pr_curve"]["recall"])
        files["pr_curve"] = str(plot_pr_curves({"SegDecNet, 101-point interpolated": (r, p)}, out / "pr_curve.png",
                                               title=f"Precision-recall (AP {res['AP']:.4f})"))
    if "roc_curve" in res:
        files["roc_curve"] = str(plot_roc_curve(res["roc_curve"]["fpr"], res["roc_curve"]["tpr"], out / "roc_curve.png",
                                                auroc=res["AUROC"]))
    # pictures: mistakes first, then defective images, then the rest
    segs = res.get("_segs")
    if segs is not None and max_images > 0:
        rows = res["per_image"]
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["decision"] == rows[i]["label"],
                                                         rows[i]["label"] == 0, -rows[i]["score"]))
        tiles, titles = [], []
        for i in order[:max_images]:
            img = dataset.read_image(i)
            heat = _upsample(segs[i], img.shape[:2])
            gt = dataset.full_mask(i)
            gt_img = (gt.astype(np.uint8) * 255) if gt is not None else np.zeros(img.shape[:2], np.uint8)
            tiles.append(np.concatenate([np.asarray(overlay_heatmap(img, np.clip(heat, 0, 1)), dtype=np.uint8),
                                         np.repeat(gt_img[..., None], 3, axis=2)], axis=1))
            titles.append(f"{rows[i]['name']} p={rows[i]['score']:.3f} y={rows[i]['label']}")
        files["heatmaps"] = str(save_image(image_grid(tiles, nrow=4, titles=titles), out / "heatmaps.jpg"))
    return files


def _public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k not in ("per_image", "_segs", "pr_curve", "roc_curve")}


# ----------------------------------------------------------------------------------------------- training


def _sampler_callback(sampler: FrequencySampler):
    """Engine callback: saves the sampler state next to each checkpoint; restores it on resume."""

    def cb(trainer: Any, event: str, info: dict) -> None:
        from safetensors.torch import load_file, save

        if event == "checkpoint" and trainer.is_main:
            state = {k: v.contiguous() for k, v in sampler.state_dict().items()}
            write_bytes_atomic(Path(info["path"]) / SAMPLER_FILE, save(state))
        elif event == "fit_start" and info.get("resumed_from"):
            f = Path(info["resumed_from"]) / SAMPLER_FILE  # the checkpoint actually loaded (maybe a fallback)
            if f.is_file():
                try:
                    sampler.load_state_dict(load_file(str(f)))
                except Exception as e:  # damaged or stale: replaying the draws gives the same state anyway
                    log.warning("ignoring %s (%s); the sampler replays its earlier epochs instead", f, e)

    return cb


def train_segdec(
    data: str | Path,
    out: str | Path,
    *,
    dataset_kind: str = "auto",
    img_size: Any = None,
    channels: int | None = None,
    epochs: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    delta: float | None = None,
    p: float | None = None,
    w_pos: float | None = None,
    dilate: int | None = None,
    dynamic: bool = True,
    grad_adjust: bool = True,
    grad_multiplier: float | None = None,
    frequency: bool = True,
    weighted: bool = True,
    num_segmented: int | None = None,
    backbone: str | None = None,
    pretrained: bool | str = False,
    width: float = 1.0,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    scheduler: str = "constant",
    workers: int = 0,
    resume: bool | str = False,
    max_steps: int | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    checkpoint_every: int = 0,
    skip_bad: bool = False,
    cache: bool = False,
    mixed_precision: str = "auto",
    cpu: bool = False,
    progress: bool = True,
    dagm_class: int | None = None,
    fold: int = 0,
    final_eval: bool = True,
    max_images: int = 16,
    exist_ok: bool = False,
    keep_last: int = 2,
) -> dict[str, Any]:
    """Train SegDecNet end-to-end on a defect data set through the shared engine; writes the run folder ``out``.

    Unset hyper-parameters come from the dataset's official preset (:data:`PRESETS`). ``dynamic``: dynamic
    balancing of the losses; ``grad_adjust``: the decision loss does not reach the segmentation net (gradient
    multiplier 0, or ``grad_multiplier``); ``frequency``: frequency-of-use negative sampling (else uniform);
    ``weighted``: distance-transform weights of positive pixels. Returns the engine's summary plus ``eval``.
    """
    from vision.engine import TrainConfig, Trainer
    from vision.engine.run import prepare_run_dir, write_skipped

    from .data import SplitNotFoundError, detect_layout

    layout = detect_layout(data) if dataset_kind == "auto" else dataset_kind
    st = resolve_settings(layout, img_size=img_size, channels=channels, epochs=epochs, batch=batch, lr=lr,
                          delta=delta, p=p, w_pos=w_pos, dilate=dilate)
    gm = grad_multiplier if grad_multiplier is not None else (0.0 if grad_adjust else 1.0)
    data_kw = dict(dilate=int(st["dilate"]), weighted=weighted, p=float(st["p"]), w_pos=float(st["w_pos"]),
                   skip_bad=skip_bad, dagm_class=dagm_class, fold=fold, cache=cache, seed=seed)
    train_ds = load_defect_dataset(data, "train", layout, img_size=st["img_size"], channels=st["channels"],
                                   num_segmented=num_segmented, progress=progress, **data_kw)
    log.info("%s", train_ds.summary())
    if sum(train_ds.labels) == 0:
        raise ValueError(f"{data}: the training split has no defective images; SegDecNet needs some to learn from")
    try:
        eval_ds: DefectDataset | None = load_defect_dataset(
            data, "test", layout, img_size=train_ds.img_size, channels=train_ds.channels, progress=progress, **data_kw)
    except SplitNotFoundError as e:  # only an absent split trains without evaluation; a broken one is an error
        log.warning("%s; training without evaluation", e)
        eval_ds = None
    out = prepare_run_dir(out, resume=resume, exist_ok=exist_ok)
    skipped_file = write_skipped(out, {"train": train_ds.bad, **({"test": eval_ds.bad} if eval_ds is not None else {})})
    if skipped_file is not None:
        log.warning("skipped bad samples (listed in %s)", skipped_file)

    model_cfg = {"in_channels": train_ds.channels, "grad_multiplier": float(gm), "backbone": backbone,
                 "width": float(width)}
    settings = {
        "epochs": int(st["epochs"]), "batch": int(st["batch"]), "lr": float(st["lr"]), "delta": float(st["delta"]),
        "p": float(st["p"]), "w_pos": float(st["w_pos"]), "dilate": int(st["dilate"]), "dynamic": bool(dynamic),
        "grad_multiplier": float(gm), "frequency": bool(frequency), "weighted": bool(weighted),
        "num_segmented": num_segmented, "optimizer": optimizer, "momentum": momentum,
        "weight_decay": weight_decay, "scheduler": scheduler, "seed": seed, "max_steps": max_steps,
        "dagm_class": dagm_class, "fold": fold,
    }
    spec = {"format": "negvision.segdec/1", "model": model_cfg, "img_size": list(train_ds.img_size),
            "channels": train_ds.channels, "dataset_kind": layout, "data": str(data), "train": settings,
            "pretrained_backbone": pretrained if isinstance(pretrained, bool) else str(pretrained)}
    if resume and (out / SPEC_FILE).is_file():
        old = json.loads((out / SPEC_FILE).read_text())
        if old.get("model") != spec["model"] or old.get("img_size") != spec["img_size"]:
            raise ValueError(
                f"cannot resume {out}: it was trained with model {old.get('model')} at img_size "
                f"{old.get('img_size')} (HxW), now {spec['model']} at {spec['img_size']}"
            )
    from accelerate.utils import set_seed

    set_seed(seed)  # the initial weights depend on the seed only
    net = SegDecNet(train_ds.channels, grad_multiplier=gm, backbone=backbone,
                    pretrained=pretrained if not resume else False, width=width)

    sampler = FrequencySampler(train_ds.labels, seed=seed, frequency=frequency)
    use_cuda = not cpu and pick_device().type == "cuda"
    loader = DataLoader(train_ds, batch_size=int(st["batch"]), sampler=sampler, num_workers=workers,
                        pin_memory=use_cuda, drop_last=False, persistent_workers=False)

    holder: dict[str, Any] = {}

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # dynamic balancing over the configured epochs (max_steps only stops early)
        total_epochs = settings["epochs"]
        w_seg, w_dec = loss_weights(min(holder["trainer"].epoch, total_epochs), total_epochs, settings["delta"], dynamic)
        dec, seg = m(b["image"])
        out_ = segdec_loss(dec, seg, b["label"], b["seg_target"], b["seg_weight"], b["segmented"], w_seg, w_dec)
        out_["w_seg"], out_["w_dec"] = w_seg, w_dec
        return out_

    def eval_fn(m: nn.Module) -> dict[str, float]:
        assert eval_ds is not None
        res = evaluate_segdec(m, eval_ds, batch=max(1, int(st["batch"])), pixel=False)
        return {k: float(res[k]) for k in ("AP", "AUROC", "FP", "FN", "detection_rate", "FP_at_FN0")}

    every = EVAL_EVERY if eval_every is None else eval_every
    cfg = TrainConfig(out_dir=str(out), epochs=int(st["epochs"]), max_steps=max_steps, optimizer=optimizer,
                      lr=float(st["lr"]), momentum=momentum, weight_decay=weight_decay, scheduler=scheduler,
                      mixed_precision=mixed_precision, seed=seed, eval_every=every if eval_ds is not None else 0,
                      checkpoint_every=checkpoint_every, progress=progress, cpu=cpu,
                      log_every=max(1, min(10, len(loader))), keep_last=keep_last)
    trainer = Trainer(net, loader, cfg, loss_fn=loss_fn, eval_fn=eval_fn if eval_ds is not None else None,
                      metric="AP" if eval_ds is not None else None, mode="max",
                      batch_size_fn=lambda b: int(b["image"].shape[0]),
                      extra_config={"task": "segdec", "segdec": spec},
                      callbacks=[_sampler_callback(sampler)])
    holder["trainer"] = trainer
    if trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / SPEC_FILE, spec)
    summary = trainer.fit(resume=resume)
    summary["out"] = str(out)
    summary["train_data"] = train_ds.summary()
    summary["skipped"] = {"train": len(train_ds.bad), "test": len(eval_ds.bad) if eval_ds is not None else 0}
    if not trainer.is_main:
        return summary
    if final_eval and eval_ds is not None:
        final = trainer.unwrapped_model.eval()
        res = evaluate_segdec(final, eval_ds, batch=max(1, int(st["batch"])))
        summary["eval"] = _public(res)
        summary["files"] = save_eval_outputs(res, eval_ds, out / "eval", max_images=max_images)
    write_json_atomic(out / "train_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------- prediction


def _default_threshold(weights: Path) -> float:
    start = weights if weights.is_dir() else weights.parent
    for p in [start, *start.parents][:4]:
        f = p / "eval" / "metrics.json"
        if f.is_file():
            try:
                return float(json.loads(f.read_text())["threshold"])
            except (KeyError, ValueError, TypeError):
                break
    return 0.5


@torch.no_grad()
def predict_segdec(
    weights: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    seg_threshold: float = 0.5,
    batch: int = 4,
    device: str | None = None,
    heatmaps: bool = True,
    skip_bad: bool = False,
) -> list[dict[str, Any]]:
    """Run a trained SegDecNet on images. Per image: defect probability (predictions.csv / .json), the
    full-resolution mask PNG (segmentation >= ``seg_threshold``) and a heatmap overlay. ``threshold``
    (default: the run's best-F1 threshold from its evaluation, else 0.5) decides "defective"."""
    from PIL import Image

    from vision.viz import overlay_heatmap, save_image

    model, spec = load_segdec(weights, device)
    dev = next(model.parameters()).device
    thr = _default_threshold(Path(weights)) if threshold is None else float(threshold)
    h, w = spec["img_size"]
    grey = int(spec.get("channels", spec["model"].get("in_channels", 1))) == 1
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if heatmaps:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    names = dict(zip(files, output_names(files, source), strict=True))
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i in range(0, len(files), batch):
        chunk, originals, tensors = [], [], []
        for f in files[i:i + batch]:
            try:
                im = open_image(f, "L" if grey else "RGB")  # displayed orientation (EXIF applied)
                orig = np.asarray(im)
                small = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            except ImageReadError as e:
                if not skip_bad:
                    raise ValueError(str(e)) from None
                log.warning("skipping %s", e)
                skipped.append(str(e))
                continue
            chunk.append(f)
            originals.append(orig)
            tensors.append(torch.from_numpy(small[None] if grey else small.transpose(2, 0, 1).copy()))
        if not chunk:
            continue
        dec, seg = model(torch.stack(tensors).to(dev))
        probs = torch.sigmoid(dec.float()).cpu().numpy()
        seg_p = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
        for f, orig, prob, sp in zip(chunk, originals, probs, seg_p, strict=True):
            full = _upsample(sp, orig.shape[:2])
            mask = full >= seg_threshold
            stem = names[f].as_posix()
            mpath = out / "masks" / f"{stem}.png"
            buf_png = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf_png, format="PNG")
            write_bytes_atomic(mpath, buf_png.getvalue())
            rec = {"image": str(f), "probability": round(float(prob), 6), "defective": bool(prob >= thr),
                   "defect_pixels": int(mask.sum()), "width": int(orig.shape[1]), "height": int(orig.shape[0]),
                   "mask": str(mpath)}
            if heatmaps:
                hpath = out / "heatmaps" / f"{stem}.jpg"
                save_image(overlay_heatmap(orig, np.clip(full, 0, 1)), hpath)
                rec["heatmap"] = str(hpath)
            results.append(rec)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["image", "probability", "defective", "defect_pixels", "mask"])
    for r in results:
        wr.writerow([r["image"], f"{r['probability']:.6f}", int(r["defective"]), r["defect_pixels"], r["mask"]])
    write_bytes_atomic(out / "predictions.csv", buf.getvalue().encode())
    write_json_atomic(out / "predictions.json", {"threshold": thr, "seg_threshold": seg_threshold,
                                                 "skipped": skipped, "predictions": results})
    return results
