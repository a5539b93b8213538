"""``negvision data report`` on a generated digits set with planted problems: time per phase and the recall of the
planted problems (the share the report finds).

Planted (k of each, k = max(3, n / 50)): train images copied into val (exact leakage), resized and re-encoded JPEG
copies of train images in val (near leakage; scale 0.4-0.9, quality 30-90), 2 px boxes (tiny), same-class boxes
repeated with a shift of 2 % of their width (double labels, IoU about 0.96), and one class with a single training
box. The near-duplicate threshold is chosen on a set built from ``--val-seed`` (best F1 of the planted near copies
against every other pair found, ties to the larger threshold: more room for recall), then the report is timed and
scored on ``--seed``: once on a fresh folder (the validation cache is built), once again (validation answered from
the cache).

    python benchmarks/data_report.py                 # 300 images at 128 px: about 30 s on 2 CPU cores
    python benchmarks/data_report.py --n 20000       # the issue's size (~15 min to generate the two sets on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vision.data.digits import make_digits  # noqa: E402
from vision.data.report import make_report  # noqa: E402

RARE_CLASS, RARE_INTO = "9", "8"


def _labels(root: Path, split: str, stem: str) -> Path:
    return root / "labels" / split / f"{stem}.txt"


def plant(root: Path, n_train: int, img_size: int, seed: int) -> dict:
    """Plant the problems into the YOLO digits folder ``root``; returns what was planted, by kind."""
    rng = np.random.default_rng([seed, 7])
    k = max(3, (n_train * 5 // 4) // 50)
    picks = 1 + rng.choice(n_train - 1, size=4 * k, replace=False)  # train_00000 holds the rare class's box
    exact_src, near_src, tiny_at, double_at = (picks[i * k:(i + 1) * k] for i in range(4))
    img = root / "images"
    planted: dict[str, list] = {"exact": [], "near": [], "tiny": [], "double": [], "rare": [RARE_CLASS]}
    for j, i in enumerate(exact_src.tolist()):
        src = f"train_{i:05d}"
        shutil.copy(img / "train" / f"{src}.jpg", img / "val" / f"leak_exact_{j}.jpg")
        shutil.copy(_labels(root, "train", src), _labels(root, "val", f"leak_exact_{j}"))
        planted["exact"].append((f"{src}.jpg", f"leak_exact_{j}.jpg"))
    for j, i in enumerate(near_src.tolist()):
        src = f"train_{i:05d}"
        im = Image.open(img / "train" / f"{src}.jpg").convert("RGB")
        s = float(rng.uniform(0.4, 0.9))
        im = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.BILINEAR)
        im.save(img / "val" / f"leak_near_{j}.jpg", quality=int(rng.integers(30, 91)))
        shutil.copy(_labels(root, "train", src), _labels(root, "val", f"leak_near_{j}"))
        planted["near"].append((f"{src}.jpg", f"leak_near_{j}.jpg"))
    for f in sorted((root / "labels" / "train").glob("*.txt")):  # one class keeps a single training box
        lines = [(RARE_INTO + ln[1:]) if ln.startswith(RARE_CLASS + " ") else ln for ln in f.read_text().splitlines()]
        if f.stem == "train_00000":
            lines[0] = RARE_CLASS + lines[0][1:]
        f.write_text("\n".join(lines) + "\n")
    px = 1.0 / img_size
    for i in tiny_at.tolist():
        cx, cy = rng.uniform(0.1, 0.9, 2)
        with _labels(root, "train", f"train_{i:05d}").open("a") as f:
            f.write(f"0 {cx:.6f} {cy:.6f} {2 * px:.6f} {2 * px:.6f}\n")
        planted["tiny"].append(f"train_{i:05d}.jpg")
    for i in double_at.tolist():
        f = _labels(root, "train", f"train_{i:05d}")
        first = f.read_text().splitlines()[0].split()
        first[1] = f"{float(first[1]) + 0.02 * float(first[3]):.6f}"  # shifted by 2 % of its width: IoU ~0.96
        f.write_text(f.read_text() + " ".join(first) + "\n")
        planted["double"].append(f"train_{i:05d}.jpg")
    return planted


def build(folder: Path, n: int, img_size: int, seed: int) -> tuple[Path, dict]:
    n_train = n * 4 // 5
    root = make_digits(folder, format="yolo", n_train=n_train, n_val=n - n_train, img_size=img_size, seed=seed,
                       max_objects=4)
    return root, plant(root, n_train, img_size, seed)


def _name(p: dict) -> str:
    return Path(p["path"]).name


def score(doc: dict, planted: dict) -> dict:
    """Share of each planted kind the report found, and the pairs it reported that were not planted."""
    dup = doc["sections"]["duplicates"]["figures"]
    exact = [{_name(x) for x in g["images"]} for g in dup["exact"]["list"]]
    near = [{_name(p["a"]), _name(p["b"])} for p in dup["near"]["list"]]
    bp = doc["sections"]["box_problems"]["figures"]
    tiny = {Path(t["path"]).name for t in bp["tiny"] if t["size_at_img_size"] == [2.0, 2.0]}
    doubles = {Path(d["path"]).name for d in bp["double_labels"]}
    rare = doc["sections"]["counts"]["figures"]["per_class"]["train"][RARE_CLASS]["boxes"] == 1 and any(
        f"class '{RARE_CLASS}' has only 1 box" in p for p in doc["sections"]["counts"]["problems"])
    planted_exact = [set(p) for p in planted["exact"]]
    planted_near = [set(p) for p in planted["near"]]
    return {
        "exact": sum(p in exact for p in planted_exact) / len(planted_exact),
        "near": sum(p in near for p in planted_near) / len(planted_near),
        "near_not_exact": not any(p in exact for p in planted_near),
        "tiny": sum(t in tiny for t in planted["tiny"]) / len(planted["tiny"]),
        "double_label": sum(d in doubles for d in planted["double"]) / len(planted["double"]),
        "rare_class": float(rare),
        "unplanted_exact_groups": sum(g not in planted_exact for g in exact),
        "unplanted_near_pairs": sum(p not in planted_near for p in near),
    }


def choose_threshold(root: Path, planted: dict, out: Path, thresholds: list[int], img_size: int) -> tuple[int, list]:
    """The threshold of best F1 (planted near copies vs every other near pair), ties to the larger one, measured
    from one report at the largest threshold (pairs carry their distance)."""
    res = make_report(root, out, img_size=img_size, near_threshold=max(thresholds), progress=False)
    pairs = json.loads(Path(res["report_json"]).read_text())["sections"]["duplicates"]["figures"]["near"]["list"]
    truth = [set(p) for p in planted["near"]]
    rows = []
    for t in thresholds:
        found = [{_name(p["a"]), _name(p["b"])} for p in pairs if p["distance"] <= t]
        tp = sum(p in found for p in truth)
        fp = sum(p not in truth for p in found)
        f1 = 2 * tp / max(1, 2 * tp + fp + (len(truth) - tp))
        rows.append({"threshold": t, "recall": tp / len(truth), "false_pairs": fp, "f1": round(f1, 4)})
    best = max(rows, key=lambda r: (r["f1"], r["threshold"]))
    return best["threshold"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="images (80 %% train, 20 %% val) before planting")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1, help="the reported set")
    ap.add_argument("--val-seed", type=int, default=0, help="the set the near-duplicate threshold is chosen on")
    ap.add_argument("--thresholds", default="0,2,4,6,8,10,12,14,16")
    ap.add_argument("--keep", default=None, help="build the sets in this folder and keep them")
    args = ap.parse_args()
    if args.seed == args.val_seed:
        ap.error("--seed and --val-seed must differ")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="data_report_bench."))
    try:
        t0 = time.perf_counter()
        val_root, val_planted = build(work / "val_set", args.n, args.img_size, args.val_seed)
        thresholds = [int(t) for t in args.thresholds.split(",")]
        chosen, sweep = choose_threshold(val_root, val_planted, work / "val_report", thresholds, args.img_size)
        root, planted = build(work / "report_set", args.n, args.img_size, args.seed)
        make_s = time.perf_counter() - t0
        cold = make_report(root, work / "report", img_size=args.img_size, near_threshold=chosen, progress=False)
        warm = make_report(root, work / "report", img_size=args.img_size, near_threshold=chosen, progress=False)
        doc = json.loads(Path(warm["report_json"]).read_text())
        n_images = sum(v["images"] for v in doc["headline"]["splits"].values())
        total = lambda r: round(sum(r["timings"].values()), 2)  # noqa: E731
        print(json.dumps({
            "benchmark": "data_report", "images": n_images, "img_size": args.img_size, "seed": args.seed,
            "val_seed": args.val_seed, "near_threshold": chosen, "threshold_sweep_on_val_seed": sweep,
            "seconds_cold_cache": {**cold["timings"], "total": total(cold)},
            "seconds_warm_cache": {**warm["timings"], "total": total(warm)},
            "images_per_s_warm": round(n_images / max(1e-9, total(warm)), 1),
            "section_seconds_warm": warm["section_seconds"],
            "sections": list(doc["sections"]),
            "recall": score(doc, planted), "planted_per_kind": len(planted["exact"]),
            "setup_s": round(make_s, 1), "cpus": os.cpu_count(),
        }))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
