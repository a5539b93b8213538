"""Benchmark of the detection data layer's validation pass: full decode of every image, cold vs. cached.

``load_detection_dataset`` (``vision/data/detection.py``) fully decodes every image of a split once through
``ImageChecker`` (``vision/data/validate.py``, threads) and caches the result next to the data in
``.negvision-cache.json`` keyed by path, size and mtime. This script measures, on a generated YOLO data set:

  cold            no cache file: every image decoded (``load_detection_dataset(DIR, "train", progress=False)``)
  warm            the cache written by the cold pass present: every image answered from it (one stat each)
  header_only     the old header check for reference: ``verify=False, cache=False`` (PIL open, size, EXIF)
  naive_pil_loop  ``PIL.Image.open(p).load()`` over the same files, single-threaded: the naive full check

Data set: ``--n`` train images (and ``max(1, n // 10)`` val images) of ``--img-size`` px, JPEG quality 95 (the
quality ``vision.data.formats.yolo.write`` uses), content that compresses like a photo (upsampled smooth noise,
1-5 filled rectangles that are the boxes, mild grain; numpy, seeded), written directly as ``images/{split}`` +
``labels/{split}`` + ``data.yaml`` (the layout ``yolo.write`` produces, without its per-file atomic writes).
It is kept in ``--out`` with a ``gen.json`` marker and reused when n / size / seed match.

Each pass runs in its own fresh subprocess (the script re-invokes itself with ``--_pass``), after the imports:
  wall_s          the real ``load_detection_dataset`` call (its ``ImageChecker`` is wrapped to read the
                  ``checked`` / ``cached`` counters, and to pass ``workers=--threads`` when given); ``check_s`` is
                  the part spent in ``ImageChecker.prefetch`` (decode / cache look-up), the rest is yaml, listing,
                  label parsing and building the dataset.
  peak_rss_mb     ``getrusage(RUSAGE_SELF).ru_maxrss`` after minus before the timed call (fresh process, so the
                  high-water mark before is that of the imports).
  py_peak_mb      ``tracemalloc`` peak of Python allocations, from a second, traced call in the same process
                  (the cache file deleted again first for the cold pass); tracemalloc slows allocation-heavy
                  code, so it is kept out of the timed call.
The OS page cache is not dropped: after generation the files are in memory, so "cold" means "no negvision
cache", not "cold disk". ``NEGVISION_CACHE_DIR`` points to a folder inside ``--out`` so that nothing is written
to ``~/.cache``.

Output: a summary on stderr, one JSON line on stdout.

    python benchmarks/data_index.py [--n 20000] [--img-size 128] [--out DIR] [--threads N] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
GEN_VERSION = 1
CACHE_NAME = ".negvision-cache.json"  # vision.data.validate.CACHE_NAME (not imported: the parent stays light)
BENCH_CACHE_DIR = ".bench-user-cache"  # NEGVISION_CACHE_DIR for the passes, inside --out
CLASSES = ("box", "blob", "tile")
PASSES = ("cold", "warm", "header", "naive")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _n_val(n: int) -> int:
    return max(1, n // 10)


# ----------------------------------------------------------------------------------------------- generation


def _image_names(n: int) -> list[str]:
    return [f"{i:06d}.jpg" for i in range(n)]


def _gen_marker(n: int, img_size: int, seed: int) -> dict:
    return {"version": GEN_VERSION, "n": n, "n_val": _n_val(n), "img_size": img_size, "seed": seed}


def _dataset_present(out: Path, marker: dict) -> bool:
    try:
        found = json.loads((out / "gen.json").read_text())
    except (OSError, ValueError):
        return False
    if found != marker:
        return False
    for split, count in (("train", marker["n"]), ("val", marker["n_val"])):
        d = out / "images" / split
        if not d.is_dir() or sum(1 for f in os.scandir(d) if f.name.endswith(".jpg")) != count:
            return False
    return (out / "data.yaml").is_file()


def _clear_generated(out: Path) -> None:
    """Remove what a previous generation left (only the paths this script writes)."""
    for name in ("images", "labels", BENCH_CACHE_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("gen.json", "data.yaml", CACHE_NAME):
        (out / name).unlink(missing_ok=True)


def _render(rng, size: int, grain):
    """One photo-like RGB image (PIL) and its boxes (xyxy px, float) and labels."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    k = int(rng.integers(1, 6))
    boxes = np.empty((k, 4), dtype=np.float64)
    labels = rng.integers(0, len(CLASSES), k)
    lo = max(2, size // 16)
    for j in range(k):
        bw, bh = (int(v) for v in rng.integers(lo, max(lo + 1, size // 2), 2))
        x0, y0 = int(rng.integers(0, size - bw + 1)), int(rng.integers(0, size - bh + 1))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=colour)
        boxes[j] = (x0, y0, x0 + bw, y0 + bh)
    # mild grain (a random window of a pre-drawn noise field) so that JPEG sizes resemble photos, not flat art
    oy, ox = (int(v) for v in rng.integers(0, grain.shape[0] - size + 1, 2))
    arr = np.asarray(im, dtype=np.int16) + grain[oy:oy + size, ox:ox + size]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), boxes, labels


def generate(out: Path, n: int, img_size: int, seed: int) -> float:
    """Write the YOLO data set into ``out`` unless an identical one is there; seconds spent (0 when reused)."""
    import numpy as np

    marker = _gen_marker(n, img_size, seed)
    if _dataset_present(out, marker):
        _log(f"reusing the data set in {out} ({n} train + {marker['n_val']} val, {img_size}px)")
        return 0.0
    if out.exists() and any(out.iterdir()) and not (out / "gen.json").exists():
        raise SystemExit(f"{out} is not empty and holds no gen.json: not a folder this benchmark made, refusing "
                         "to write into it")
    out.mkdir(parents=True, exist_ok=True)
    _clear_generated(out)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gsize = max(256, 2 * img_size)
    grain = rng.normal(0.0, 4.0, (gsize, gsize, 1)).astype(np.int16)
    total_bytes = 0
    for split, count in (("train", n), ("val", marker["n_val"])):
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        for i, name in enumerate(_image_names(count)):
            im, boxes, labels = _render(rng, img_size, grain)
            path = img_dir / name
            im.save(path, "JPEG", quality=95)
            total_bytes += path.stat().st_size
            s = float(img_size)
            lines = "".join(
                f"{int(c)} {(b[0] + b[2]) / 2 / s:.6f} {(b[1] + b[3]) / 2 / s:.6f} {(b[2] - b[0]) / s:.6f} "
                f"{(b[3] - b[1]) / s:.6f}\n" for b, c in zip(boxes.tolist(), labels.tolist(), strict=True))
            (lbl_dir / name).with_suffix(".txt").write_text(lines)
            if (i + 1) % 5000 == 0:
                _log(f"  generated {i + 1}/{count} {split} images ({time.perf_counter() - t0:.1f} s)")
    names = "".join(f"  - {c}\n" for c in CLASSES)
    (out / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/val\nnc: {len(CLASSES)}\nnames:\n{names}")
    (out / "gen.json").write_text(json.dumps(marker))
    dt = time.perf_counter() - t0
    n_all = n + marker["n_val"]
    _log(f"generated {n_all} images in {dt:.1f} s ({n_all / dt:.0f} img/s), mean JPEG "
         f"{total_bytes / n_all / 1024:.1f} KiB")
    return dt


# ----------------------------------------------------------------------------------------------- child side


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _delete_caches(out: Path) -> None:
    (out / CACHE_NAME).unlink(missing_ok=True)
    user = out / BENCH_CACHE_DIR
    if user.is_dir():
        shutil.rmtree(user)
    user.mkdir()


def _loader_pass(out: Path, which: str, threads: int | None) -> dict:
    """One pass of the real load_detection_dataset in this (fresh) process: timed call, then a traced one."""
    import tracemalloc

    import vision.data.detection as det

    made: list = []
    check_s = [0.0]

    class RecordingChecker(det.ImageChecker):
        """The loader's ImageChecker, kept for its counters and timed in prefetch; workers from --threads."""

        def __init__(self, *args, **kwargs):
            if threads is not None:
                kwargs["workers"] = threads
            super().__init__(*args, **kwargs)
            made.append(self)

        def prefetch(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super().prefetch(*args, **kwargs)
            finally:
                check_s[0] += time.perf_counter() - t

    det.ImageChecker = RecordingChecker
    kwargs = {"verify": False, "cache": False} if which == "header" else {}

    def call():
        made.clear()
        check_s[0] = 0.0
        t = time.perf_counter()
        ds = det.load_detection_dataset(out, "train", progress=False, **kwargs)
        return ds, time.perf_counter() - t

    if which == "cold":
        _delete_caches(out)
    gc.collect()
    rss0 = _maxrss_mb()
    ds, wall = call()
    rss1 = _maxrss_mb()
    checker = made[0]
    res = {
        "wall_s": round(wall, 4),
        "images_per_s": round(len(ds) / wall, 1) if wall > 0 else None,
        "check_s": round(check_s[0], 4),
        "peak_rss_mb": round(rss1 - rss0, 2),
        "rss_base_mb": round(rss0, 1),
        "decoded": checker.checked if checker.full_decode else 0,
        "cached": checker.cached,
        "checked": checker.checked,
        "workers": checker.workers,
        "n_dataset": len(ds),
    }
    if which != "header":  # the header pass runs with cache=False
        cache_file = out / CACHE_NAME
        res["cache_bytes"] = cache_file.stat().st_size if cache_file.is_file() else 0
        res["user_cache_files"] = sum(1 for p in (out / BENCH_CACHE_DIR).rglob("*") if p.is_file())
    del ds, checker
    made.clear()

    if which == "cold":
        _delete_caches(out)
    gc.collect()
    tracemalloc.start()
    ds, traced_wall = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res["py_peak_mb"] = round(peak / MIB, 2)
    res["traced_wall_s"] = round(traced_wall, 4)
    if made[0].checked + made[0].cached != res["checked"] + res["cached"]:
        res["traced_counts_differ"] = True
    return res


def _naive_pass(out: Path) -> dict:
    from PIL import Image

    files = sorted((out / "images" / "train").glob("*.jpg"))
    gc.collect()
    rss0 = _maxrss_mb()
    t = time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            im.load()
    wall = time.perf_counter() - t
    return {"wall_s": round(wall, 4), "images_per_s": round(len(files) / wall, 1) if wall > 0 else None,
            "n": len(files), "peak_rss_mb": round(_maxrss_mb() - rss0, 2)}


def _child(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    res = _naive_pass(out) if args._pass == "naive" else _loader_pass(out, args._pass, args.threads)
    print(json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------- parent side


def _run_pass(which: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--n", str(args.n),
           "--img-size", str(args.img_size), "--_pass", which]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, NEGVISION_CACHE_DIR=str(out / BENCH_CACHE_DIR))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"pass '{which}' failed (exit {proc.returncode})")
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="train images (val: n // 10)")
    ap.add_argument("--img-size", type=int, default=128, help="side of the square images, px")
    ap.add_argument("--out", default=None,
                    help="data set folder (generated there, reused when it matches; default: a temp folder)")
    ap.add_argument("--threads", type=int, default=None,
                    help="ImageChecker(workers=...) for the loader passes; default: the checker's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_pass", choices=PASSES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n < 1 or args.img_size < 16:
        ap.error("--n must be >= 1 and --img-size >= 16")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args._pass is not None:
        _child(args)
        return

    t_all = time.perf_counter()
    out = Path(args.out).expanduser().resolve() if args.out else Path(tempfile.mkdtemp(prefix="data_index_"))
    generate_s = generate(out, args.n, args.img_size, args.seed)
    (out / BENCH_CACHE_DIR).mkdir(exist_ok=True)

    results = {}
    for which in PASSES:  # order matters: cold writes the cache that warm reads
        _log(f"pass {which} ...")
        results[which] = _run_pass(which, args, out)
    cold, warm, header, naive = (results[k] for k in PASSES)
    ratio = round(cold["wall_s"] / warm["wall_s"], 2) if warm["wall_s"] > 0 else None

    _log(f"{'pass':<16}{'wall s':>9}{'img/s':>10}{'check s':>9}{'RSS+ MiB':>10}{'py MiB':>8}"
         f"{'decoded':>9}{'cached':>8}")
    for name, r in (("cold", cold), ("warm", warm), ("header_only", header)):
        _log(f"{name:<16}{r['wall_s']:>9.3f}{r['images_per_s']:>10.0f}{r['check_s']:>9.3f}{r['peak_rss_mb']:>10.1f}"
             f"{r['py_peak_mb']:>8.1f}{r['decoded']:>9}{r['cached']:>8}")
    _log(f"{'naive_pil_loop':<16}{naive['wall_s']:>9.3f}{naive['images_per_s']:>10.0f}")
    _log(f"cold / warm = {ratio}; cache file {cold['cache_bytes'] / MIB:.2f} MiB; checker workers "
         f"{cold['workers']}; data set {out}")

    print(json.dumps({
        "benchmark": "data_index",
        "n_images": args.n,
        "n_val_images": _n_val(args.n),
        "img_size": args.img_size,
        "generate_s": round(generate_s, 3),
        "cold": cold,
        "warm": warm,
        "header_only": header,
        "naive_pil_loop": naive,
        "cold_over_warm": ratio,
        "cpu_count": os.cpu_count(),
        "threads": args.threads if args.threads is not None else cold["workers"],
        "threads_default": args.threads is None,
        "total_s": round(time.perf_counter() - t_all, 2),
        "out": str(out),
    }), flush=True)


if __name__ == "__main__":
    main()
