"""SegDecNet training and inference speed (images/s) and peak memory, beside a reference network timed the same way in
the same run (torchvision's ResNet-18 with a 2-class head, the input repeated to 3 channels: how fast this machine
runs a well-known model of similar size); prints one JSON line.

    python benchmarks/segdec_speed.py                      # paper network, 512x512 grey, batch 1, CPU-feasible
    python benchmarks/segdec_speed.py --device cuda --batch 8 --steps 20 --amp bf16

Training = forward + the full SegDecNet loss (weighted seg BCE + decision BCE) + backward + plain SGD step.
Peak memory is CUDA's max_memory_allocated on a GPU, the process's peak RSS (ru_maxrss) on a CPU
(inference runs first, so its RSS figure excludes training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.segdec import SegDecNet, segdec_loss  # noqa: E402
from vision.device import pick_device  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(model, opt, forward, step, dev: torch.device, args, autocast) -> tuple[float, float, float, float]:
    """(inference images/s, its peak memory, training images/s, its peak memory) of ``forward`` / ``step``."""
    B = args.batch
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.eval()
    with torch.no_grad():
        for _ in range(args.warmup):
            with autocast():
                forward()
        _sync(dev)
        t = time.perf_counter()
        for _ in range(args.steps):
            with autocast():
                forward()
        _sync(dev)
    infer_ips = B * args.steps / (time.perf_counter() - t)
    infer_mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    for _ in range(args.warmup):
        step()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(dev)
    train_ips = B * args.steps / (time.perf_counter() - t)
    train_mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
    return infer_ips, infer_mem, train_ips, train_mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=512, help="square input side (multiple of 8)")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's network)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    ap.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-reference", action="store_true", help="skip the ResNet-18 reference row")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    model = SegDecNet(args.channels, width=args.width).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    B, S = args.batch, args.img_size
    x = torch.rand(B, args.channels, S, S, device=dev)
    label = (torch.arange(B, device=dev) % 2).float()
    target = torch.rand(B, 1, S // 8, S // 8, device=dev)
    weight = torch.ones_like(target)
    segmented = torch.ones(B, dtype=torch.bool, device=dev)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def segdec_step() -> None:
        with autocast():
            dec, seg = model(x)
            loss = segdec_loss(dec, seg, label, target, weight, segmented, 0.5, 0.5)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    infer_ips, infer_mem, train_ips, train_mem = _time(model, opt, lambda: model(x), segdec_step, dev, args, autocast)
    reference = None
    if not args.no_reference and S >= 64:  # ResNet-18's last stage needs more than 1x1 per sample to train
        import torchvision

        ref = torchvision.models.resnet18(num_classes=2).to(dev)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
        x3 = x[:, :1].repeat(1, 3, 1, 1)
        y = label.long()

        def ref_step() -> None:
            with autocast():
                loss = torch.nn.functional.cross_entropy(ref(x3), y)
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()

        r_infer, _, r_train, _ = _time(ref, ref_opt, lambda: ref(x3), ref_step, dev, args, autocast)
        reference = {"model": "torchvision resnet18 (2 classes, 3-channel input)",
                     "params_m": round(sum(p.numel() for p in ref.parameters()) / 1e6, 3),
                     "train_images_per_s": round(r_train, 3), "infer_images_per_s": round(r_infer, 3)}

    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(json.dumps({
        "benchmark": "segdec_speed",
        "device": str(dev),
        "device_name": dev_name,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "img_size": f"{S}x{S}",
        "channels": args.channels,
        "batch": B,
        "width": args.width,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "amp": args.amp,
        "steps": args.steps,
        "train_images_per_s": round(train_ips, 3),
        "infer_images_per_s": round(infer_ips, 3),
        "peak_memory_mb_train": round(train_mem, 1),
        "peak_memory_mb_infer": round(infer_mem, 1),
        "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_peak_rss",
        "reference": reference,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
