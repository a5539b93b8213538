"""The papers' ablation of SegDecNet on the generated DAGM-style set; prints one JSON line of figures.

Variants: the full method; without dynamic balancing, gradient-flow adjustment, frequency-of-use sampling or
distance-transform weights (each alone, all masks used); and fully vs mixed vs weakly supervised (all masks,
``--mixed`` defective images with masks, none; the weak run without dynamic balancing, as the official one). Every
variant keeps the papers' setup (their trunk, the decision loss of unmasked samples stopped as in the official code,
no augmentation); the weak / mixed defaults that deviate from it are measured in ``segdec_weak.py``. Each variant
trains from the same seed on the same data and is
evaluated on the test split: AP, AUROC, detection rate, FP and FN at the best-F1 threshold, FP at FN = 0, Dice.

Defaults fit 2 CPU cores in under ~10 minutes: one DAGM-like class (the "fabric" texture, all four defect
types), 64x64 images, a narrower trunk (``--width 0.25``), 20 epochs, one seed. The figures show what each part
does on a small problem, not the papers' DAGM numbers; differences of a few AP points are within seed noise.
Bigger runs: ``--width 1 --img-size 256 --dilate 7 --n-train 800 --n-test 400 --epochs 50 --seeds 3`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.segdec import (  # noqa: E402
    SegDecConfig,
    evaluate_segdec,
    load_defect_dataset,
    load_segdec,
    train_segdec,
)
from vision.data.defects import make_defects  # noqa: E402
from vision.engine import RunOptions, TrainConfig  # noqa: E402

VARIANTS: dict[str, dict] = {
    "full": {},
    "no_dynamic_balancing": {"dynamic": False},
    "no_gradient_adjustment": {"grad_adjust": False},
    "no_frequency_sampling": {"frequency": False},
    "no_distance_weights": {"weighted": False},
    "mixed_supervision": {"num_segmented": "mixed"},
    # the official weakly supervised runs (N_0 in EXPERIMENTS_COMIND.sh) switch dynamic balancing off
    "weak_supervision": {"num_segmented": 0, "dynamic": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--defect-fraction", type=float, default=0.3)
    ap.add_argument("--textures", default="fabric", help="comma-separated textures of the generated set ('' = all)")
    ap.add_argument("--defects", default="", help="comma-separated defect types ('' = all)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--w-pos", type=float, default=10.0)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--dilate", type=int, default=3, help="mask dilation kernel (thin defects need it at 1/8)")
    ap.add_argument("--width", type=float, default=0.25, help="trunk channel multiplier (1 = the paper's network)")
    ap.add_argument("--seg-threshold", type=float, default=0.25,
                    help="pixel threshold for Dice/IoU (soft 1/8 targets of thin defects at 64x64 stay below 0.5)")
    ap.add_argument("--mixed", type=int, default=None,
                    help="defective training images that keep masks in mixed supervision (default: a quarter)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat every variant with seeds 0..N-1 (mean reported)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: small models on a shared CPU run fastest single-threaded)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    ap.add_argument("--data", default=None, help="use this defect folder instead of generating one")
    ap.add_argument("--out", default=None, help="keep runs here (default: a temp folder, deleted)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="segdec_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if args.data:
            data = Path(args.data)
        else:
            data = make_defects(work / "data", n_train=args.n_train, n_test=args.n_test, img_size=args.img_size,
                                seed=1234, defect_fraction=args.defect_fraction, image_level_fraction=0.0,
                                textures=[t for t in args.textures.split(",") if t] or None,
                                defects=[t for t in args.defects.split(",") if t] or None)
        train_info = load_defect_dataset(data, "train")
        n_pos = sum(train_info.labels)
        mixed = args.mixed if args.mixed is not None else max(1, n_pos // 4)
        results: dict[str, dict] = {}
        for name in names:
            runs = []
            for seed in range(args.seeds):
                kw = dict(VARIANTS[name])
                if kw.get("num_segmented") == "mixed":
                    kw["num_segmented"] = mixed
                run_dir = work / f"{name}_s{seed}"
                t = time.time()
                train_segdec(  # the papers' setup
                    data,
                    SegDecConfig(delta=args.delta, w_pos=args.w_pos, p=args.p, dilate=args.dilate, width=args.width,
                                 final_eval=False, cache=True, backbone="paper", weak_grad_multiplier=0.0,
                                 augment=False, **kw),
                    TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=seed, eval_every=0),
                    RunOptions(out=run_dir, workers=args.workers, device="cpu" if args.cpu else None, progress=False))
                train_s = time.time() - t
                model, spec = load_segdec(run_dir, "cpu" if args.cpu else None)
                test = load_defect_dataset(data, "test", img_size=tuple(spec["img_size"]), channels=spec["channels"])
                res = evaluate_segdec(model, test, batch=8, seg_threshold=args.seg_threshold)
                runs.append({k: res[k] for k in ("AP", "AUROC", "detection_rate", "FP", "FN", "FP_at_FN0", "dice",
                                                 "iou")} | {"train_s": train_s})
                print(f"{name} seed {seed}: AP={res['AP']:.3f} AUROC={res['AUROC']:.3f} FP={res['FP']} "
                      f"FN={res['FN']} dice={res['dice']:.3f} ({train_s:.0f}s)", file=sys.stderr, flush=True)
            agg = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            if args.seeds > 1:
                agg["AP_std"] = float(np.std([r["AP"] for r in runs]))
            results[name] = {k: round(v, 4) for k, v in agg.items()}
        test_info = load_defect_dataset(data, "test")
        print(json.dumps({
            "benchmark": "segdec_ablation",
            "device": "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "cpu_count": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "data": {"generated": not args.data, "img_size": args.img_size, "textures": args.textures or "all",
                     "defects": args.defects or "all", "train_images": len(train_info),
                     "train_defective": n_pos, "test_images": len(test_info), "test_defective": sum(test_info.labels)},
            "settings": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "delta": args.delta,
                         "w_pos": args.w_pos, "p": args.p, "dilate": args.dilate,
                         "width": args.width, "seg_threshold": args.seg_threshold, "seeds": args.seeds,
                         "mixed_num_segmented": mixed},
            "results": results,
            "wall_s": round(time.time() - t0, 1),
        }))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
