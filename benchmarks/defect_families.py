"""Surface defects from image labels across defect FAMILIES (visible marks, local texture changes, global texture
changes): texture statistics + logistic regression, the official weak settings, `defect train` labels only, with 5 %
masks, and the good-images-only PatchCore baseline; one JSON line.

Per family and seed: a training set, a validation set (another generator stream) and a held-out test set (another
seed). `defect train` picks its best epoch on the validation set (``--val-data``) and nothing is chosen on the test
set. ``--choose`` instead trains each candidate setting (``CANDIDATES``) labels-only on the families' validation data
of the choice seeds (``--choose-seeds``, distinct from the report seeds) and prints their validation AUROC per family:
defaults are picked from that, never from a test split.

    python benchmarks/defect_families.py [--families marks,local_texture,global_texture] [--seeds 0,1,2]
        [--n-train 300] [--n-val 100] [--n-test 200] [--img-size 96] [--epochs 10]
    python benchmarks/defect_families.py --choose [--choose-seeds 100,101]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segdec_weak import texture_lr  # noqa: E402

from detectors.segdec import (  # noqa: E402
    SegDecConfig,
    evaluate_segdec,
    load_defect_dataset,
    load_segdec,
    train_segdec,
)
from detectors.segdec.anomaly import PatchCoreConfig, train_patchcore  # noqa: E402
from vision.data.defects import FAMILIES, make_defects  # noqa: E402
from vision.engine import RunOptions, TrainConfig  # noqa: E402

# labels-only settings compared on validation data (--choose): SegDecConfig fields, and TrainConfig fields under
# "train"; "default" is whatever train_segdec does unasked
_FLIPS = {"flip": True, "rot90": False, "brightness": 0.0, "contrast": 0.0}
CANDIDATES: dict[str, dict] = {
    "default": {},
    "stats_head": {"stats_head": True},
    "no_stats_head": {"stats_head": False},
    "stats_trunk_0.1": {"stats_head": True, "trunk_lr_scale": 0.1},
    "stats_trunk_0.3": {"stats_head": True, "trunk_lr_scale": 0.3},
    "stats_frozen_trunk": {"stats_head": True, "trunk_lr_scale": 0.0},
    "no_augment": {"augment": False},
    "flips_only": {"augment": _FLIPS},
    "geometric": {"augment": {"flip": True, "rot90": True, "brightness": 0.0, "contrast": 0.0}},
    "lr_1e-4": {"train": {"lr": 1e-4}},
    "flips_only_lr_3e-4": {"augment": _FLIPS, "train": {"lr": 3e-4}},
}


def _train(data: Path, out: Path, a: argparse.Namespace, seed: int, epochs: int | None = None, **settings) -> None:
    """train_segdec with the benchmark's common run: batch 8, CPU, no progress, a reused folder."""
    train = TrainConfig(epochs=epochs or a.epochs, batch_size=8, seed=seed, **settings.pop("train", {}))
    train_segdec(data, SegDecConfig(**settings), train,
                 RunOptions(out=out, device="cpu", progress=False, workers=0, exist_ok=True))


def _sets(root: Path, family: str, seed: int, a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(train folder, validation folder, test folder) of one family and seed: three generator streams."""
    kw = dict(img_size=a.img_size, defect_fraction=0.5, image_level_fraction=0.0, family=family)
    tr = make_defects(root / f"{family}_train{seed}", n_train=a.n_train, n_test=0, seed=seed, **kw)
    va = make_defects(root / f"{family}_val{seed}", n_train=a.n_val, n_test=0, seed=5_000 + seed, **kw)
    te = make_defects(root / f"{family}_test{seed}", n_train=0, n_test=a.n_test, seed=10_000 + seed, **kw)
    return tr, va, te


def _eval(run: Path, test_root: Path) -> dict:
    model, spec = load_segdec(run, "cpu")
    test = load_defect_dataset(test_root, "test", img_size=spec["img_size"], channels=spec["channels"],
                               progress=False)
    res = evaluate_segdec(model, test, batch=16, pixel=False)
    return {"AP": float(res["AP"]), "AUROC": float(res["AUROC"])}


def _val_curve(run: Path) -> list[float]:
    """Validation AUROC after each epoch (metrics.csv)."""
    f = run / "metrics.csv"
    if not f.is_file():
        return []
    return [float(r["AUROC"]) for r in csv.DictReader(open(f))]


def _summary(rows: dict[str, list[dict]]) -> dict:
    return {k: {m: {"mean": round(float(np.mean([r[m] for r in v])), 4), "std": round(float(np.std([r[m] for r in v])), 4)}
                for m in ("AP", "AUROC") if all(m in r for r in v)} for k, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--official-epochs", type=int, default=6)
    p.add_argument("--paper-width", type=float, default=0.5)
    p.add_argument("--rows", default="texture_lr,official_weak,default,masks_5pct,patchcore")
    p.add_argument("--choose", action="store_true", help="Compare CANDIDATES on validation data of --choose-seeds.")
    p.add_argument("--choose-seeds", default="100,101")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--out", default=None, help="Keep the runs here (default: a temporary folder).")
    a = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    families = a.families.split(",")
    t0 = time.time()
    result: dict = {"benchmark": "defect_families", "families": families, "n_train": a.n_train, "n_val": a.n_val,
                    "n_test": a.n_test, "img_size": a.img_size, "epochs": a.epochs}
    with tempfile.TemporaryDirectory(prefix="negvision-defect-families-") as tmp:
        root = Path(a.out) if a.out else Path(tmp)
        if a.choose:
            seeds = [int(s) for s in a.choose_seeds.split(",")]
            val: dict = {}
            for family in families:
                for seed in seeds:
                    tr, va, _ = _sets(root, family, seed, argparse.Namespace(**{**vars(a), "n_test": 0}))
                    for name in a.candidates.split(","):
                        run = root / f"choose_{family}_{seed}_{name}"
                        _train(tr, run, a, seed, num_segmented=0, val_data=va, **CANDIDATES[name])
                        curve = _val_curve(run)
                        val.setdefault(name, {}).setdefault(family, []).append(max(curve) if curve else float("nan"))
                        print(f"{family} seed {seed} {name}: val AUROC best {max(curve):.3f} last {curve[-1]:.3f}",
                              file=sys.stderr, flush=True)
            result.update(choose_seeds=seeds, val_auroc={n: {f: round(float(np.mean(v)), 4) for f, v in fam.items()}
                                                         for n, fam in val.items()})
            result["val_auroc_worst_family"] = {n: min(f.values()) for n, f in result["val_auroc"].items()}
        else:
            seeds = [int(s) for s in a.seeds.split(",")]
            wanted = a.rows.split(",")
            per: dict = {}
            for family in families:
                rows: dict[str, list[dict]] = {}
                for seed in seeds:
                    tr, va, te = _sets(root, family, seed, a)
                    train_ds = load_defect_dataset(tr, "train", progress=False)
                    n_def = sum(train_ds.labels)
                    if "texture_lr" in wanted:
                        rows.setdefault("texture_lr", []).append(texture_lr(
                            train_ds, load_defect_dataset(va, "train", progress=False),
                            load_defect_dataset(te, "test", progress=False)))
                    if "official_weak" in wanted:
                        run = root / f"{family}_official{seed}"
                        _train(tr, run, a, seed, epochs=a.official_epochs, backbone="paper", width=a.paper_width,
                               dynamic=False, weak_grad_multiplier=0.0, augment=False, num_segmented=0, val_data=va)
                        rows.setdefault("official_weak", []).append(_eval(run, te))
                    for name, k in (("default", 0), ("masks_5pct", max(1, round(0.05 * n_def)))):
                        if name not in wanted:
                            continue
                        run = root / f"{family}_{name}{seed}"
                        _train(tr, run, a, seed, num_segmented=k, val_data=va)
                        r = _eval(run, te)
                        curve = _val_curve(run)
                        spec = json.loads((run / "segdec.json").read_text())
                        r["val_AUROC_selected"] = spec.get("validation_metrics", {}).get("AUROC")
                        r["val_AUROC_best_epoch"] = max(curve) if curve else None
                        rows.setdefault(name, []).append(r)
                    if "patchcore" in wanted:
                        run = root / f"{family}_patchcore{seed}"
                        train_patchcore(tr, PatchCoreConfig(val_data=va, seed=seed, final_eval=False),
                                        RunOptions(out=run, device="cpu", progress=False, exist_ok=True))
                        rows.setdefault("patchcore", []).append(_eval(run, te))
                    print(f"{family} seed {seed}: " + ", ".join(f"{k} {v[-1]['AUROC']:.3f}" for k, v in rows.items()),
                          file=sys.stderr, flush=True)
                per[family] = {"summary": _summary(rows), "per_seed": rows}
                s = per[family]["summary"]
                if "default" in s and "texture_lr" in s:
                    per[family]["default_minus_texture_lr_auroc"] = round(
                        s["default"]["AUROC"]["mean"] - s["texture_lr"]["AUROC"]["mean"], 4)
                if "default" in rows:
                    per[family]["selected_minus_best_val_auroc"] = round(min(
                        (r["val_AUROC_selected"] or 0) - (r["val_AUROC_best_epoch"] or 0) for r in rows["default"]), 4)
            result.update(seeds=seeds, families_result=per)
    result.update(seconds=round(time.time() - t0, 1), cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
