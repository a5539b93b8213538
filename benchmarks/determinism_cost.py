"""The cost of ``--deterministic``: training step time of ATSS and SegDecNet with PyTorch's deterministic kernels on
and off, interleaved step by step (round-robin, so a change in machine load hits both alike), on one device.

Prints ONE JSON line: median ms per step per model and mode, and the ratio deterministic / default. On the CPU the
kernels are deterministic already, so the ratio should be 1 within noise; on a GPU it is the price of bit-identical
runs (cuBLAS workspace setting, no cuDNN autotuning, deterministic scatter / index kernels).

    python benchmarks/determinism_cost.py [--img-size 256] [--batch 8] [--rounds 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0.offline")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fpn-channels", type=int, default=128)
    p.add_argument("--segdec-size", type=int, default=256, help="SegDecNet input side (the paper's trunk)")
    p.add_argument("--rounds", type=int, default=8, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    from vision.seeding import CUBLAS_WORKSPACE, use_deterministic

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before the first cuBLAS call, both modes
    import torch

    from detectors.segdec import SegDecNet
    from detectors.segdec.losses import segdec_loss
    from detectors.zoo import create_detector
    from vision.data import detection_collate, load_detection_dataset
    from vision.data.digits import make_digits
    from vision.device import pick_device

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        make_digits(tmp, format="coco", n_train=a.batch, n_val=1, img_size=a.img_size, seed=0)
        ds = load_detection_dataset(tmp, "train", progress=False)
        images, targets = detection_collate([ds[i] for i in range(a.batch)])
    images = [im.to(dev) for im in images]
    targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
    torch.manual_seed(0)
    atss = create_detector("atss", 10, backbone=a.backbone, pretrained_backbone=False, freeze_bn=True,
                           fpn_channels=a.fpn_channels, min_size=a.img_size, max_size=a.img_size).to(dev).train()
    segdec = SegDecNet(1).to(dev).train()
    s = a.segdec_size
    x = torch.rand(a.batch, 1, s, s, device=dev)
    label = (torch.arange(a.batch, device=dev) % 2).float()
    seg_t = torch.zeros(a.batch, 1, s // 8, s // 8, device=dev)
    seg_t[label > 0, :, : s // 32, : s // 32] = 1.0
    seg_w = torch.ones_like(seg_t)
    segmented = torch.ones(a.batch, device=dev)

    def atss_loss():
        return sum(atss(images, targets).values())

    def segdec_step_loss():
        dec, seg = segdec(x)
        return segdec_loss(dec, seg, label, seg_t, seg_w, segmented, 1.0, 1.0)["loss"]

    models = {"atss": (atss, atss_loss), "segdec": (segdec, segdec_step_loss)}
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for n, (m, _) in models.items()}

    def step(name: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = models[name][1]()
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[tuple[str, bool], list[float]] = {(n, d): [] for n in models for d in (False, True)}
    errors: dict[str, str] = {}
    try:
        for r in range(a.warmup + a.rounds):
            for (n, det), ts in times.items():
                if n in errors:
                    continue
                use_deterministic(det)
                try:
                    t = step(n)
                except RuntimeError as e:  # an op without a deterministic kernel on this device
                    errors[n] = str(e).splitlines()[0][:300]
                    continue
                if r >= a.warmup:
                    ts.append(t)
    finally:
        use_deterministic(False)
    med = {k: statistics.median(v) * 1000 for k, v in times.items() if v}
    out = {"benchmark": "determinism_cost", "device": str(dev), "threads": torch.get_num_threads(),
           "backbone": a.backbone, "img_size": a.img_size, "segdec_size": a.segdec_size, "batch": a.batch,
           "rounds": a.rounds,
           "step_ms": {n: {"default": round(med[(n, False)], 1), "deterministic": round(med[(n, True)], 1)}
                       for n in models if (n, True) in med and (n, False) in med},
           "errors": errors}
    out["ratio"] = {n: round(v["deterministic"] / v["default"], 3) for n, v in out["step_ms"].items()}
    for n, v in out["step_ms"].items():
        print(f"{n:8s} default {v['default']:8.1f} ms  deterministic {v['deterministic']:8.1f} ms  "
              f"x{out['ratio'][n]:.3f}", file=sys.stderr)
    for n, e in errors.items():
        print(f"{n}: {e}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
