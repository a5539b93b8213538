"""Benchmark of the ATSS assigner: vectorised (chunked over gts) vs. a per-gt loop vs. a dense A x G variant.

Implementations (all in ``detectors/atss/assigner.py``):
  vectorised  ``atss_assign(..., max_elements=--max-elements)``: gts processed in chunks so that no gt x
              level-anchors block exceeds ``max_elements`` entries; IoUs for the candidates only.
  loop        ``atss_assign_loop``: plain Python loop over gts, one sort per level per gt.
  dense       ``atss_assign_dense``: a transcription of the official code, whole A x G IoU / distance matrices
              at once, as the official and mmdetection assigners do; shows the memory the vectorised one saves.

Layout: one square anchor of side 8*s per location of each level s in (8, 16, 32, 64, 128), grid
ceil(H/s) x ceil(W/s), centred at (x*s, y*s) (``detectors.atss.grid_anchors``). G random gts (seeded), sides
4..300 px (capped by the image size), entirely inside the image.

Every (implementation, G) pair runs in a fresh process (multiprocessing forkserver whose server has only imported
torch and the assigner; spawn where forkserver is missing), so the peak memory of one pair is not polluted by
another. In each process a code-path warm-up on the first <= 10 gts runs before the memory baseline (lazy
library initialisation is not the assigner's memory), then:
  time          median over ``--repeats`` calls after one full-size warm-up call, fewer once the timed calls
                reach 10 s; the loop gets no full-size warm-up and min(repeats, 3) repeats, a single one from
                1000 gts on.
  peak (CPU)    peak RSS increase over the RSS after building anchors and gts: the kernel's high-water mark
                (VmHWM) is reset through /proc/self/clear_refs, falling back to the getrusage ru_maxrss
                difference where that is not possible. Includes allocator slack (glibc arenas, page granularity).
  alloc (CPU)   peak of live bytes allocated by torch during one call, from torch.profiler memory events
                (profile_memory=True): a finer figure, free of allocator and page effects. Run for all pairs
                in one extra process after the timings (skip with --no-profile).
  peak (CUDA)   torch.cuda.max_memory_allocated() increase over memory_allocated() before the calls; timing
                synchronises before and after each call.
Outputs are compared through a SHA-256 of the assignment vector: ``identical`` is true when all implementations
that ran for that G returned the same assignment.

Output: a table on stderr, one JSON line on stdout.

    python benchmarks/atss_assign.py [--gts 1,10,100,1000] [--device cpu|cuda] [--repeats 5]
                                     [--max-loop-gts 1000] [--max-elements 4194304] [--image-size 800x1333]
                                     [--threads N] [--no-profile]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STRIDES = (8, 16, 32, 64, 128)
IMPLS = ("vectorised", "loop", "dense")
DENSE_MAX_ELEMENTS = 2**62
DEFAULT_MAX_ELEMENTS = 1 << 22  # the atss_assign default
MIB = 2**20
MAX_TIMED_S = 10.0  # no further repeats once the timed calls of one measurement have taken this long


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 800x1333, got {text!r}") from e
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return h, w


def _parse_gts(text: str) -> list[int]:
    try:
        gts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
    if not gts or any(g < 1 for g in gts):
        raise argparse.ArgumentTypeError(f"gt counts must be >= 1, got {text!r}")
    return gts


def _feature_sizes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = image_size
    return [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]


def _layout_name(image_size: tuple[int, int]) -> str:
    return f"{image_size[0]}x{image_size[1]} P3-P7"


def _random_gts(num: int, image_size: tuple[int, int], seed: int):
    """``num`` xyxy boxes with sides in [4, 300] px (capped by the image) lying inside the image; seeded, CPU."""
    import torch

    h, w = image_size
    g = torch.Generator().manual_seed(seed * 1_000_003 + num)
    lo = min(4, h, w)
    bw = torch.randint(lo, min(300, w) + 1, (num,), generator=g).float()
    bh = torch.randint(lo, min(300, h) + 1, (num,), generator=g).float()
    x0 = torch.rand(num, generator=g) * (w - bw)
    y0 = torch.rand(num, generator=g) * (h - bh)
    return torch.stack((x0, y0, x0 + bw, y0 + bh), dim=1)


# ----------------------------------------------------------------------------------------------- child side


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); True when VmHWM now matches VmRSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64


def _ru_maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _setup(cfg: dict, impl: str, num_gts: int):
    """(device, anchors, gts, fn): ``fn(boxes=gts)`` runs ``impl`` on the anchor layout of ``cfg``."""
    import torch

    from detectors.atss import atss_assign, atss_assign_dense, atss_assign_loop, grid_anchors

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    sizes = _feature_sizes(cfg["image_size"])
    anchors = grid_anchors(sizes, STRIDES, [8.0 * s for s in STRIDES], device=device)
    napl = [h * w for h, w in sizes]
    gts = _random_gts(num_gts, cfg["image_size"], cfg["seed"]).to(device)
    topk = cfg["topk"]
    if impl == "vectorised":
        def fn(boxes=gts):
            return atss_assign(anchors, napl, boxes, topk=topk, max_elements=cfg["max_elements"])
    elif impl == "dense":
        def fn(boxes=gts):
            return atss_assign_dense(anchors, napl, boxes, topk=topk)
    elif impl == "loop":
        def fn(boxes=gts):
            return atss_assign_loop(anchors, napl, boxes, topk=topk)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return device, anchors, gts, fn


def _measure(cfg: dict, impl: str, num_gts: int) -> dict:
    """Time and peak memory of ``impl`` on ``num_gts`` gts; meant to run in a fresh process."""
    import torch

    device, anchors, gts, fn = _setup(cfg, impl, num_gts)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # Code-path warm-up on a few gts before the baseline: lazy library/kernel initialisation and first-touch
    # of shared code pages are not the assigner's memory. It is the loop's only warm-up (a full one would double
    # a long run); the other implementations get a full-size warm-up call inside the measured window.
    fn(gts[: min(num_gts, 10)])
    sync()
    if impl == "loop":
        repeats, full_warmup = (1 if num_gts >= 1000 else min(cfg["repeats"], 3)), False
    else:
        repeats, full_warmup = cfg["repeats"], True

    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        peak_method = "cuda max_memory_allocated increase"
    elif _reset_peak_rss():
        base = _proc_status_kib("VmRSS")
        peak_method = "peak RSS increase (VmHWM reset via clear_refs)"
    else:
        base = _ru_maxrss_kib()
        peak_method = "peak RSS increase (ru_maxrss delta)"

    if full_warmup:
        fn()
        sync()
    times = []
    out = None
    for _ in range(repeats):
        if sum(times) >= MAX_TIMED_S:  # slow case: a median of fewer calls
            break
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)

    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / MIB
    elif "clear_refs" in peak_method:
        peak_mib = (_proc_status_kib("VmHWM") - base) / 1024
    else:
        peak_mib = (_ru_maxrss_kib() - base) / 1024

    assigned = out.detach().to("cpu", torch.int64).contiguous()
    return {
        "anchors": anchors.shape[0],
        "ms": statistics.median(times) * 1e3,
        "repeats": len(times),
        "peak_mib": peak_mib,
        "peak_method": peak_method,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "num_pos": int((assigned >= 0).sum()),
        "sha256": hashlib.sha256(assigned.numpy().tobytes()).hexdigest(),
    }


def _alloc_peaks(cfg: dict, pairs: list[tuple[str, int]]) -> list[float]:
    """For each (impl, G): peak live bytes (MiB) torch allocates during one call, from torch.profiler memory
    events. Independent of allocator state, so all pairs share one process (the profiler starts once)."""
    from torch.profiler import ProfilerActivity, profile

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # kineto logs profiler_start/stop lines on fd 2; this process reports through a pipe
    peaks = []
    for impl, num_gts in pairs:
        _, _, gts, fn = _setup(cfg, impl, num_gts)
        fn(gts[: min(num_gts, 10)])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        peaks.append(peak / MIB)
    return peaks


def _entry(conn, name: str, *args) -> None:
    try:
        conn.send(("ok", globals()[name](*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- parent side


def _in_fresh_process(ctx, name: str, *args):
    """Run ``name(*args)`` in a new process of ``ctx`` and return its result."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(send, name, *args), daemon=True)
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError as e:
        proc.join()
        raise RuntimeError(f"{name}{args[1:]} died with exit code {proc.exitcode}") from e
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{name}{args[1:]} failed:\n{value}")
    return value


def _fmt(v, spec: str) -> str:
    """``format(v, spec)``, or a dash of the same width for a skipped measurement."""
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def _table(summary: dict) -> str:
    rows = summary["results"]
    head = (f"{'gts':>5} | {'vec ms':>9} {'loop ms':>10} {'dense ms':>9} {'x loop':>7} | "
            f"{'vec MiB':>8} {'loop MiB':>8} {'dense MiB':>9} | "
            f"{'vec alloc':>9} {'loop alloc':>10} {'dense alloc':>11} | {'chunks':>6} {'pos':>6} identical")
    lines = [
        f"ATSS assign benchmark: device={summary['device']} layout={summary['layout']} "
        f"anchors={summary['anchors']} max_elements={summary['max_elements']} threads={summary['threads']} "
        f"torch={summary['torch']}",
        f"peak MiB = {summary['peak_method']}; alloc = torch.profiler live-bytes peak (MiB)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['gts']:>5} | {_fmt(r['vectorised_ms'], '9.2f')} {_fmt(r['loop_ms'], '10.2f')} "
            f"{_fmt(r['dense_ms'], '9.2f')} {_fmt(r['speedup_vs_loop'], '7.1f')} | "
            f"{_fmt(r['vectorised_peak_mib'], '8.1f')} {_fmt(r['loop_peak_mib'], '8.1f')} "
            f"{_fmt(r['dense_peak_mib'], '9.1f')} | "
            f"{_fmt(r['vectorised_alloc_peak_mib'], '9.1f')} {_fmt(r['loop_alloc_peak_mib'], '10.1f')} "
            f"{_fmt(r['dense_alloc_peak_mib'], '11.1f')} | {r['vectorised_chunks']:>6} {r['num_pos']:>6} "
            f"{r['identical']}"
        )
    return "\n".join(lines)


def _mp_context():
    """forkserver: every measurement is a fresh process forked from a server that has only imported torch and
    the assigner (no tensor work, no threads, no CUDA context), so each child skips the ~4 s import; spawn
    where forkserver does not exist."""
    methods = mp.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torchvision.ops", "detectors.atss"])
    return ctx, method


def _run_parent(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    cfg = {k: getattr(args, k) for k in ("device", "repeats", "max_elements", "image_size", "topk", "seed", "threads")}
    ctx, method = _mp_context()
    profile_alloc = not args.no_profile and not args.device.startswith("cuda")
    results, pairs, meta = [], [], None
    for num_gts in args.gts:
        row: dict = {"gts": num_gts}
        hashes, npos = {}, {}
        for impl in IMPLS:
            if impl == "loop" and args.max_loop_gts is not None and num_gts > args.max_loop_gts:
                row.update({"loop_ms": None, "loop_peak_mib": None, "loop_alloc_peak_mib": None, "loop_repeats": 0})
                continue
            res = _in_fresh_process(ctx, "_measure", cfg, impl, num_gts)
            meta = meta or res
            row[f"{impl}_ms"] = round(res["ms"], 3)
            row[f"{impl}_peak_mib"] = round(res["peak_mib"], 2)
            row[f"{impl}_alloc_peak_mib"] = None
            row[f"{impl}_repeats"] = res["repeats"]
            hashes[impl], npos[impl] = res["sha256"], res["num_pos"]
            pairs.append((impl, num_gts))
            print(f"  {impl:>10} gts={num_gts:<5} {res['ms']:10.2f} ms  peak {res['peak_mib']:8.1f} MiB",
                  file=sys.stderr, flush=True)
        loop_ms = row.get("loop_ms")
        row["speedup_vs_loop"] = round(loop_ms / row["vectorised_ms"], 2) if loop_ms else None
        n_max = max(h * w for h, w in _feature_sizes(args.image_size))  # chunks: gts x largest level <= max_elements
        row["vectorised_chunks"] = math.ceil(num_gts / max(1, min(num_gts, args.max_elements // n_max)))
        row["num_pos"] = npos["vectorised"]
        row["compared"] = sorted(hashes)
        row["identical"] = len(set(hashes.values())) == 1
        results.append(row)
    if profile_alloc:
        print("  torch.profiler allocation pass ...", file=sys.stderr, flush=True)
        peaks = _in_fresh_process(ctx, "_alloc_peaks", cfg, pairs)
        by_gts = {r["gts"]: r for r in results}
        for (impl, num_gts), peak in zip(pairs, peaks, strict=True):
            by_gts[num_gts][f"{impl}_alloc_peak_mib"] = round(peak, 2)
    return {
        "benchmark": "atss_assign",
        "device": args.device,
        "layout": _layout_name(args.image_size),
        "anchors": meta["anchors"],
        "anchors_per_level": [h * w for h, w in _feature_sizes(args.image_size)],
        "topk": args.topk,
        "max_elements": args.max_elements,
        "dense_max_elements": DENSE_MAX_ELEMENTS,
        "repeats": args.repeats,
        "seed": args.seed,
        "threads": meta["threads"],
        "torch": meta["torch"],
        "isolation": f"one fresh {method} process per (implementation, gts)",
        "peak_method": meta["peak_method"],
        "alloc_method": "torch.profiler profile_memory live-bytes peak" if profile_alloc else None,
        "all_identical": all(r["identical"] for r in results),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--gts", type=_parse_gts, default=[1, 10, 100, 1000], help="comma-separated gt counts")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--max-loop-gts", type=int, default=None, help="skip the per-gt loop above this many gts")
    p.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                   help=f"chunk bound of the vectorised implementation (default {DEFAULT_MAX_ELEMENTS})")
    p.add_argument("--image-size", type=_parse_size, default=(800, 1333), help="HxW (default 800x1333)")
    p.add_argument("--topk", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler allocation pass (CPU)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.max_elements < 1:
        p.error("--max-elements must be >= 1")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # the forkserver inherits sys.path for its preload imports

    summary = _run_parent(args)
    print(_table(summary), file=sys.stderr, flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
