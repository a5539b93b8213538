"""Detector quality: ATSS vs. torchvision FCOS vs. torchvision RetinaNet under one training recipe.

All models share the backbone, the FPN (P3-P7, ``--fpn-channels``), the data (the generated digits set,
``vision.data.digits.make_digits``), the image size, the epochs, the optimizer (SGD, momentum 0.9, weight decay
1e-4, cosine schedule with linear warm-up: the engine's defaults) and the seed; only the learning rate may differ
per model (``--lr-per-model``). FCOS and RetinaNet are torchvision's models on this toolkit's backbone + FPN
(``detectors/zoo.py``); everything trains through ``detectors.detect.train_detector``.

Data      made once into ``--data-dir/coco_<size>px_train<n>_val<n>_seed<data-seed>`` and reused from there.
          The data seed (``--data-seed``) is separate from the training seeds, so every seed sees the same data.
Runs      each (model, seed) pair trains in a fresh process (forked from a multiprocessing forkserver that has
          only imported torch and the toolkit; spawn where forkserver is missing), so that its peak memory is
          its own (CPU: the process's peak RSS, which includes the Python/torch runtime and the data loader
          parent; CUDA: torch.cuda.max_memory_allocated during training) and no state leaks between models.
Quality   COCO AP / AP50 / AP75 (pycocotools, 0..1) on the val split, of the final weights (``--eval-every 0``,
          the default) or of the best epoch on val (``--eval-every N``: selection on the same split).
Speed     ``train images/s``: the engine's throughput over the whole training (data loading included).
          ``step ms``: the pure training step, measured in the same process right after training: forward +
          backward + SGD step (same optimizer settings and mixed precision as the engine) on one fixed batch
          of ``--batch`` un-augmented training images, median over ``--step-iters`` steps after
          ``--step-warmup`` warm-up steps (the JSON also has the minimum and every timing: on a busy machine
          single steps can stall for seconds). ``step/FCOS`` is that median divided by FCOS's for the same seed.
Seeds     with several ``--seeds``, figures are mean ± sample std over seeds.

Output: a table on stderr, one JSON line on stdout (every figure, the exact configuration and the device).

    python benchmarks/detector_quality.py [--models atss,fcos,retinanet] [--backbone efficientnet_lite0.offline]
        [--pretrained|--no-pretrained] [--img-size 256] [--n-train 400] [--n-val 100] [--epochs 6] [--batch 8]
        [--lr 0.01] [--lr-per-model fcos=0.01,retinanet=0.01] [--fpn-channels 128] [--seeds 0,1,2]
        [--data-dir benchmarks/out/digits] [--out benchmarks/out/detector_quality] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # spawned workers re-import this file as __mp_main__

KNOWN_MODELS = ("atss", "fcos", "retinanet")
REFERENCE = "fcos"
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4  # TrainConfig defaults, used by train_detector's SGD
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------- argument parsing
def _csv_models(text: str) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in KNOWN_MODELS]
    if not models or bad:
        raise argparse.ArgumentTypeError(f"models must be a comma list of {', '.join(KNOWN_MODELS)}, got {text!r}")
    if len(set(models)) != len(models):
        raise argparse.ArgumentTypeError(f"duplicate model in {text!r}")
    return models


def _csv_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _lr_map(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in KNOWN_MODELS:
            raise argparse.ArgumentTypeError(f"expected model=lr pairs (models: {', '.join(KNOWN_MODELS)}), got {item!r}")
        try:
            out[name] = float(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad learning rate in {item!r}") from e
        if not out[name] > 0:
            raise argparse.ArgumentTypeError(f"learning rate must be > 0 in {item!r}")
    return out


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv_models, default=list(KNOWN_MODELS), help="comma list (default: all three)")
    p.add_argument("--backbone", default="efficientnet_lite0.offline")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="ImageNet backbone weights (frozen BatchNorm, as train_detector does)")
    p.add_argument("--img-size", type=_positive, default=256, help="digits image side and detector min/max size")
    p.add_argument("--n-train", type=_positive, default=400)
    p.add_argument("--n-val", type=_positive, default=100)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (same for every run)")
    p.add_argument("--epochs", type=_positive, default=6)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of every model not in --lr-per-model")
    p.add_argument("--lr-per-model", type=_lr_map, default={}, metavar="NAME=LR,...",
                   help="per-model learning rates, e.g. fcos=0.01,retinanet=0.01")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: min(100, a third of the total steps))")
    p.add_argument("--fpn-channels", type=_positive, default=128, help="FPN width (a multiple of 32: GroupNorm heads)")
    p.add_argument("--seeds", type=_csv_seeds, default=[0], help="comma list of training seeds")
    p.add_argument("--eval-every", type=int, default=0,
                   help="0: evaluate the final weights once; N: evaluate every N epochs and report the best epoch")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="train_detector's training augmentation")
    p.add_argument("--data-dir", type=Path, default=Path("benchmarks/out/digits"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/detector_quality"))
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per run (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    p.add_argument("--step-warmup", type=int, default=3, help="untimed steps before the step-time measurement")
    p.add_argument("--step-iters", type=_positive, default=10, help="timed steps (the median is reported)")
    return p


# ----------------------------------------------------------------------------- worker side (fresh processes)
def _quiet_stdout() -> None:
    """Send everything a worker prints (Python or C level) to stderr: stdout carries only the JSON line."""
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _dataset_key(cfg: dict[str, Any]) -> str:
    return f"coco_{cfg['img_size']}px_train{cfg['n_train']}_val{cfg['n_val']}_seed{cfg['data_seed']}"


def make_data_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """Generate the digits set once (into a temporary folder renamed into place), or reuse the cached one."""
    _quiet_stdout()
    root = Path(cfg["data_dir"])
    target = root / _dataset_key(cfg)
    marker = target / "digits.json"
    params = {k: cfg[k] for k in ("img_size", "n_train", "n_val", "data_seed")}
    if marker.is_file():
        return {"path": str(target), "reused": True, "params": json.loads(marker.read_text())}
    from vision.data.digits import make_digits

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    make_digits(tmp, format="coco", n_train=cfg["n_train"], n_val=cfg["n_val"], img_size=cfg["img_size"],
                seed=cfg["data_seed"])
    (tmp / "digits.json").write_text(json.dumps({**params, "format": "coco"}))
    try:
        os.replace(tmp, target)  # another process may have won the race: then use its copy
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return {"path": str(target), "reused": False, "params": params, "time_s": time.perf_counter() - t0}


def _device_info(torch: Any, device: Any) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        name = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["name"] = name or platform.machine()
    return info


def _time_steps(torch: Any, out: Path, data: str, device: Any, lr: float, batch: int, mixed_precision: str,
                warmup: int, iters: int) -> dict[str, Any]:
    """Median forward + backward + SGD step of the trained model on one fixed, un-augmented training batch."""
    from contextlib import nullcontext

    from detectors.detect import load_detector
    from vision.data import detection_collate, load_detection_dataset

    model, _ = load_detector(out, device=device)
    model.train()
    ds = load_detection_dataset(data, "train")
    images, targets = detection_collate([ds[i] for i in range(min(batch, len(ds)))])
    images = [im.to(device) for im in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    cuda = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            loss = sum(model(images, targets).values())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"step_ms": statistics.median(times), "step_ms_min": min(times), "step_ms_all": times, "step_batch": len(images),
            "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params)}


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed) run in a fresh process: train, evaluate, then time the pure training step."""
    _quiet_stdout()
    import torch

    if job["threads"] > 0:
        torch.set_num_threads(job["threads"])
    from detectors.detect import DetectConfig, train_detector
    from vision.device import pick_device
    from vision.engine import RunOptions, TrainConfig

    rec: dict[str, Any] = {"model": job["model"], "seed": job["seed"], "lr": job["lr"], "out": job["out"]}
    device = pick_device("cpu" if job["cpu"] else None)
    rec["device"] = _device_info(torch, device)
    t0 = time.perf_counter()
    try:
        summary = train_detector(
            job["data"],
            DetectConfig(model=job["model"], backbone=job["backbone"], pretrained=job["pretrained"],
                         img_size=job["img_size"], augment=job["augment"],
                         model_kwargs={"fpn_channels": job["fpn_channels"]}),
            TrainConfig(epochs=job["epochs"], batch_size=job["batch"], lr=job["lr"], warmup_steps=job["warmup_steps"],
                        seed=job["seed"], eval_every=job["eval_every"]),
            RunOptions(out=job["out"], workers=job["workers"], device="cpu" if job["cpu"] else None, progress=False),
        )
    except Exception as e:  # a diverged or crashed run is a result too: report it and go on with the others
        rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20),
                   wall_s=time.perf_counter() - t0)
        return rec
    ev = summary.get("eval") or {}
    rec.update({k: _num(ev.get(k)) for k in METRICS})
    rec.update(
        train_images_per_s=_num(summary.get("images_per_s")),
        eval_images_per_s=_num(ev.get("images_per_s")),
        train_time_s=_num(summary.get("train_time_s")),
        steps=summary.get("steps"),
        total_steps=summary.get("total_steps"),
        skipped_steps=summary.get("skipped_steps"),
        last_loss=_num(summary.get("last_loss")),
        peak_memory_mb=_num(summary.get("peak_memory_mb")),
        mixed_precision=summary.get("mixed_precision"),
        evaluated="best" if (Path(job["out"]) / "checkpoints" / "best" / "model.safetensors").is_file() else "last",
        best_step=summary.get("best_step"),
    )
    try:
        rec.update(_time_steps(torch, Path(job["out"]), job["data"], device, job["lr"], job["batch"],
                               summary.get("mixed_precision") or "no", job["step_warmup"], job["step_iters"]))
    except Exception as e:
        rec.update(step_error=f"{type(e).__name__}: {e}", step_ms=None)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _num(v: Any) -> float | None:
    """JSON-safe float (nan/inf/None -> None)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- parent side
# imported once by the forkserver, so that each run's process starts without paying for them again
PRELOAD = ["torch", "torchvision", "vision.data", "vision.engine", "vision.metrics", "detectors.detect", "detectors.zoo"]


def _mp_context() -> Any:
    """forkserver (preloaded with torch and the toolkit) where available, else spawn: never a fork of this process."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _in_fresh_process(ctx: Any, fn: Any, arg: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(fn, arg).result()


def _stats(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def _fmt(s: dict[str, Any], spec: str) -> str:
    if s["mean"] is None:
        return "-"
    text = format(s["mean"], spec)
    return text if s["std"] is None else f"{text} ± {format(s['std'], spec)}"


def summarise(runs: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    ref = {r["seed"]: r.get("step_ms") for r in runs if r["model"] == REFERENCE and not r.get("error")}
    for r in runs:
        ref_ms, ms = ref.get(r["seed"]), r.get("step_ms")
        r["step_ratio_vs_fcos"] = ms / ref_ms if ms and ref_ms else None
    keys = (*METRICS, "train_images_per_s", "eval_images_per_s", "train_time_s", "step_ms", "step_ratio_vs_fcos",
            "peak_memory_mb")
    out: dict[str, Any] = {}
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        ok = [r for r in rs if not r.get("error")]
        out[m] = {k: _stats([r.get(k) for r in ok]) for k in keys}
        out[m]["seeds"] = [r["seed"] for r in ok]
        out[m]["failed_seeds"] = [r["seed"] for r in rs if r.get("error")]
    return out


def print_table(summary: dict[str, Any], models: list[str], file: Any = sys.stderr) -> None:
    cols = [("model", None, ""), ("AP", "AP", ".3f"), ("AP50", "AP50", ".3f"), ("AP75", "AP75", ".3f"),
            ("train img/s", "train_images_per_s", ".1f"), ("step ms", "step_ms", ".0f"),
            ("step/FCOS", "step_ratio_vs_fcos", ".2f"), ("peak MB", "peak_memory_mb", ".0f")]
    rows = []
    for m in models:
        s = summary[m]
        row = [m + (f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"] else "")]
        row += [_fmt(s[key], spec) for _, key, spec in cols[1:]]
        rows.append(row)
    widths = [max(len(c[0]), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c[0].ljust(w) if i == 0 else c[0].rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True)))
    print(line, file=file)
    print("-" * len(line), file=file)
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))), file=file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fpn_channels % 32:
        print(f"warning: --fpn-channels {args.fpn_channels} is not a multiple of 32 (GroupNorm(32) heads)",
              file=sys.stderr)
    unused = sorted(set(args.lr_per_model) - set(args.models))
    if unused:
        print(f"warning: --lr-per-model names models that are not run: {', '.join(unused)}", file=sys.stderr)
    t_start = time.perf_counter()
    data_dir, out_dir = args.data_dir.resolve(), args.out.resolve()
    data_cfg = {"data_dir": str(data_dir), "img_size": args.img_size, "n_train": args.n_train, "n_val": args.n_val,
                "data_seed": args.data_seed}
    ctx = _mp_context()
    data = _in_fresh_process(ctx, make_data_job, data_cfg)
    print(f"data: {data['path']} ({'reused' if data['reused'] else 'generated'})", file=sys.stderr)

    steps_per_epoch = math.ceil(args.n_train / args.batch)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, (steps_per_epoch * args.epochs) // 3)
    lrs = {m: args.lr_per_model.get(m, args.lr) for m in args.models}
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for model in args.models:
            job = {"model": model, "seed": seed, "lr": lrs[model], "data": data["path"],
                   "out": str(out_dir / f"{model}_seed{seed}"), "backbone": args.backbone,
                   "pretrained": args.pretrained, "img_size": args.img_size, "epochs": args.epochs,
                   "batch": args.batch, "warmup_steps": warmup, "workers": args.workers, "eval_every": args.eval_every,
                   "augment": args.augment, "fpn_channels": args.fpn_channels, "threads": args.threads,
                   "cpu": args.cpu, "step_warmup": args.step_warmup, "step_iters": args.step_iters}
            print(f"[{len(runs) + 1}/{len(args.seeds) * len(args.models)}] training {model} seed {seed} "
                  f"(lr {lrs[model]:g}) -> {job['out']}", file=sys.stderr, flush=True)
            try:
                rec = _in_fresh_process(ctx, train_job, job)
            except Exception as e:  # the worker process died (e.g. killed for memory)
                rec = {"model": model, "seed": seed, "lr": lrs[model], "out": job["out"],
                       "error": f"worker process failed: {type(e).__name__}: {e}"}
            if rec.get("error"):
                print(f"  {model} seed {seed} FAILED: {rec['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {model} seed {seed}: AP {rec['AP']}, step {rec.get('step_ms') or float('nan'):.0f} ms, "
                      f"{rec['wall_s']:.0f} s", file=sys.stderr, flush=True)
            runs.append(rec)

    summary = summarise(runs, args.models)
    device = next((r["device"] for r in runs if "device" in r), None)
    for r in runs:
        r.pop("device", None)
    ranking = sorted((m for m in args.models if summary[m]["AP"]["mean"] is not None),
                     key=lambda m: summary[m]["AP"]["mean"], reverse=True)
    ranking_text = "".join(
        (m if i == 0 else (" = " if summary[m]["AP"]["mean"] == summary[ranking[i - 1]]["AP"]["mean"] else " > ") + m)
        for i, m in enumerate(ranking))
    print(file=sys.stderr)
    print_table(summary, args.models)
    print(f"\nranking by mean AP: {ranking_text or '-'}; device: {device and device.get('name')}", file=sys.stderr)
    config = {
        "models": args.models, "backbone": args.backbone, "pretrained": args.pretrained,
        "freeze_bn": args.pretrained, "img_size": args.img_size, "n_train": args.n_train, "n_val": args.n_val,
        "data_seed": args.data_seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "lr_per_model": lrs,
        "optimizer": "sgd", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "scheduler": "cosine",
        "warmup_steps": warmup, "steps_per_epoch": steps_per_epoch, "fpn_channels": args.fpn_channels,
        "fpn_levels": "P3-P7", "seeds": args.seeds, "eval_every": args.eval_every, "augment": args.augment,
        "workers": args.workers, "threads": args.threads, "cpu": args.cpu, "step_warmup": args.step_warmup,
        "step_iters": args.step_iters, "data": data["path"], "data_reused": data["reused"], "out": str(out_dir),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    result = {"benchmark": "detector_quality", "config": config, "device": device, "summary": summary,
              "ranking_by_AP": ranking, "ranking_by_AP_text": ranking_text, "runs": runs,
              "wall_s": time.perf_counter() - t_start}
    print(json.dumps(result, allow_nan=False))
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
