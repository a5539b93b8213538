"""Training step time of ATSS vs torchvision FCOS / RetinaNet on the same backbone, FPN and batch, interleaved.

The models take turns step by step (round-robin), so a change in machine load hits all of them alike; the median
per model and the ratio to FCOS are printed as ONE JSON line (a table goes to stderr).

    python benchmarks/detector_step_time.py [--backbone efficientnet_lite0.offline] [--img-size 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="atss,fcos,retinanet")
    p.add_argument("--backbone", default="efficientnet_lite0.offline")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="load the backbone weights (speed does not depend on them)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fpn-channels", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    import torch

    from detectors.zoo import create_detector
    from vision.data import detection_collate, load_detection_dataset
    from vision.data.digits import make_digits
    from vision.device import pick_device

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        make_digits(tmp, format="coco", n_train=a.batch, n_val=1, img_size=a.img_size, seed=0)
        ds = load_detection_dataset(tmp, "train")
        images, targets = detection_collate([ds[i] for i in range(a.batch)])
    images = [im.to(dev) for im in images]
    targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
    models, opts = {}, {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        m = create_detector(name, 10, backbone=a.backbone, pretrained_backbone=a.pretrained, freeze_bn=True,
                            fpn_channels=a.fpn_channels, min_size=a.img_size, max_size=a.img_size).to(dev).train()
        models[name] = m
        opts[name] = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def step(name: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = sum(models[name](images, targets).values())
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(a.warmup + a.rounds):
        for n in models:
            t = step(n)
            if r >= a.warmup:
                times[n].append(t)
    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    ref = med.get("fcos")
    out = {"benchmark": "detector_step_time", "device": str(dev), "threads": torch.get_num_threads(),
           "backbone": a.backbone, "img_size": a.img_size, "batch": a.batch, "fpn_channels": a.fpn_channels,
           "rounds": a.rounds, "step_ms": {n: round(v, 1) for n, v in med.items()},
           "ratio_vs_fcos": {n: round(v / ref, 3) for n, v in med.items()} if ref else None,
           "params_m": {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for n, m in models.items()}}
    for n in med:
        print(f"{n:10s} {med[n]:8.1f} ms/step" + (f"  x{med[n] / ref:.2f} FCOS" if ref else ""), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
