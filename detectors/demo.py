"""The main job (`./run demo`): digits set -> ATSS on EfficientNet-Lite0 (ImageNet weights) -> eval -> predictions."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

DEMO_MODEL = dict(fpn_channels=128, num_convs=4)  # the paper's head (4-conv towers, GN), 128 FPN channels for CPU
DEMO_EPOCHS = 6


def run_demo(out: Path = Path("runs/demo"), n_train: int = 400, n_val: int = 100, img_size: int = 256, batch: int = 8,
             epochs: int = DEMO_EPOCHS, workers: int = 1) -> dict[str, Any]:
    """Make the digits set, train ATSS for ``epochs`` (sized to fit 10 minutes on 2 CPU cores), evaluate, predict."""
    from detectors.detect import DetectConfig, predict_images, train_detector
    from vision.data.digits import make_digits
    from vision.device import pick_device
    from vision.engine import RunOptions, TrainConfig

    out = Path(out)
    t_start = time.perf_counter()
    data = out / "digits"
    if not (data / "annotations" / "instances_val.json").is_file():
        print(f"[demo] 1/4 making the digits set: {n_train} train + {n_val} val images of {img_size}px -> {data}")
        make_digits(data, format="coco", n_train=n_train, n_val=n_val, img_size=img_size, seed=0)
    else:
        print(f"[demo] 1/4 digits set already at {data}")
    device = pick_device()
    steps_per_epoch = math.ceil(n_train / batch)
    print(f"[demo] 2/4 training ATSS (efficientnet_lite0.offline, ImageNet weights) on {device}: "
          f"{epochs} epochs x {steps_per_epoch} steps, batch {batch}, {img_size}px")
    run = out / "run"
    summary = train_detector(
        data,
        DetectConfig(model="atss", backbone="efficientnet_lite0.offline", pretrained=True, img_size=img_size,
                     model_kwargs=dict(DEMO_MODEL)),
        TrainConfig(epochs=epochs, batch_size=batch, lr=0.01, warmup_steps=min(100, steps_per_epoch), seed=0,
                    eval_every=max(1, epochs // 3), clip_grad_norm=10.0),
        RunOptions(out=run, exist_ok=True, workers=workers))
    ev = summary.get("eval", {})
    print("[demo] 3/4 evaluation on the validation split (pycocotools COCOeval):")
    print(f"        AP {ev.get('AP', float('nan')):.4f}  AP50 {ev.get('AP50', float('nan')):.4f}  "
          f"AP75 {ev.get('AP75', float('nan')):.4f}")
    pred_dir = out / "predictions"
    sample = sorted((data / "images" / "val").iterdir())[:8]
    predict_images(run, sample, pred_dir, score_thresh=0.3)
    print(f"[demo] 4/4 predictions (JSON + pictures) for {len(sample)} images -> {pred_dir}")
    report = {
        "AP": ev.get("AP"), "AP50": ev.get("AP50"), "AP75": ev.get("AP75"),
        "train_images_per_s": summary.get("images_per_s"), "peak_memory_mb": summary.get("peak_memory_mb"),
        "epochs": epochs, "steps": summary.get("steps"), "wall_s": round(time.perf_counter() - t_start, 1),
        "device": str(device), "run": str(run), "predictions": str(pred_dir),
        "files": summary.get("files", {}),
    }
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"[demo] done in {report['wall_s']} s. mAP (AP@[.5:.95]) = {report['AP']:.4f}, AP50 = {report['AP50']:.4f}")
    print(f"[demo] run folder: {run} (metrics.json, pr_curves.png, val_predictions.jpg, log.csv, checkpoints/)")
    return report
