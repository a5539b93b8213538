"""Detector inference speed, PyTorch eager against onnxruntime on the same run and machine; prints one JSON line.

    python benchmarks/export_speed.py                          # 100 digits images at 512 px, 1 and 2 threads
    python benchmarks/export_speed.py --n 4 --img-size 128     # small size
    python benchmarks/export_speed.py --backbone resnet10t --random-backbone --fpn-channels 32   # any timm name, random

The run is ATSS on the offline EfficientNet-Lite0 (ImageNet weights) with a random head (speed does not need
training), written as a run folder and exported with ``detectors.atss.export.export_detector`` (dynamic shapes,
NMS in the graph). Both paths time ``predict`` on decoded images: resize / normalise / pad, network,
post-processing and boxes mapped back. CPU threads: ``torch.set_num_threads`` / onnxruntime ``intra_op_num_threads``. CUDA
figures (PyTorch eager, fp32 and an fp16 export in onnxruntime's CUDA provider when installed) only with CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.atss.export import OnnxDetector, export_detector  # noqa: E402
from detectors.detect import build_from_spec, load_detector, model_spec  # noqa: E402


def make_run(root: Path, backbone: str, img_size: int, fpn_channels: int, score_thresh: float,
             pretrained: bool = True) -> Path:
    """A run folder (detector.json + model.safetensors) with the backbone's weights (or random ones) and a random
    head."""
    from vision.data import DIGIT_CLASSES
    from vision.engine import save_model_weights
    from vision.io import write_json_atomic

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    spec = model_spec("atss", len(DIGIT_CLASSES), DIGIT_CLASSES, backbone, pretrained, img_size,
                      fpn_channels=fpn_channels, score_thresh=score_thresh)
    torch.manual_seed(0)
    model = build_from_spec(spec, pretrained_backbone=pretrained)
    write_json_atomic(run / "detector.json", spec)
    save_model_weights(model, run / "model.safetensors")
    return run


def load_images(root: Path, n: int, img_size: int) -> list[np.ndarray]:
    from PIL import Image

    from vision.data import make_digits

    data = make_digits(root / "digits", "yolo", n_train=1, n_val=n, img_size=img_size, seed=0)
    files = sorted((data / "images" / "val").iterdir())[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_torch(model: torch.nn.Module, images: list[np.ndarray], batch: int, dev: torch.device,
               warmup: int) -> tuple[float, list[dict]]:
    """Images/s of the PyTorch model (eager, no_grad) over ``images``, after ``warmup`` batches."""
    def run(chunk: list[np.ndarray]) -> list[dict]:
        ims = [torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255).to(dev) for a in chunk]
        return [{k: v.cpu() for k, v in d.items()} for d in model(ims)]

    with torch.no_grad():
        for i in range(warmup):
            run(images[i * batch:(i + 1) * batch] or images[:batch])
        _sync(dev)
        t0 = time.perf_counter()
        out: list[dict] = []
        for i in range(0, len(images), batch):
            out += run(images[i:i + batch])
        _sync(dev)
    return len(images) / (time.perf_counter() - t0), out


def time_onnx(det: OnnxDetector, images: list[np.ndarray], batch: int, warmup: int) -> tuple[float, list[dict]]:
    for i in range(warmup):
        det.predict(images[i * batch:(i + 1) * batch] or images[:batch])
    t0 = time.perf_counter()
    out: list[dict] = []
    for i in range(0, len(images), batch):
        out += det.predict(images[i:i + batch])
    return len(images) / (time.perf_counter() - t0), out


def max_score_diff(a: list[dict], b: list[dict]) -> float:
    """Largest score difference between two prediction lists of equal lengths (inf when the counts differ)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        sx, sy = np.asarray(x["scores"], np.float64), np.asarray(y["scores"], np.float64)
        if sx.shape != sy.shape:
            return float("inf")
        if sx.size:
            worst = max(worst, float(np.abs(sx - sy).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images to predict")
    ap.add_argument("--img-size", type=int, default=512, help="image side and the model's img_size")
    ap.add_argument("--batch", type=int, default=4, help="images per predict call")
    ap.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    ap.add_argument("--backbone", default="efficientnet_lite0.offline")
    ap.add_argument("--fpn-channels", type=int, default=256)
    ap.add_argument("--random-backbone", action="store_true",
                    help="random backbone weights (any timm name; the smoke test's small, fast-to-export model)")
    ap.add_argument("--score-thresh", type=float, default=0.01,
                    help="the random head scores about its 0.01 prior everywhere: 0.01 makes about half the anchors "
                         "candidates, so NMS has as much work as it can get (1000 per level)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches before each measurement")
    ap.add_argument("--workdir", type=Path, default=None, help="where the images, run and .onnx go (default: temp)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(tmp.name) if tmp is not None else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    images = load_images(root, args.n, args.img_size)
    run = make_run(root, args.backbone, args.img_size, args.fpn_channels, args.score_thresh,
                   pretrained=not args.random_backbone)

    torch.set_num_threads(max(threads))
    t0 = time.perf_counter()
    path = export_detector(run, root / "model.onnx")
    export_s = time.perf_counter() - t0

    res: dict = {"benchmark": "export_speed", "n_images": len(images), "img_size": args.img_size,
                 "backbone": args.backbone, "fpn_channels": args.fpn_channels, "batch": args.batch,
                 "score_thresh": args.score_thresh,
                 "export_s": round(export_s, 2), "onnx_mb": round(path.stat().st_size / 2**20, 2),
                 "images_per_s": {}, "ort_vs_torch": {}}
    cpu = torch.device("cpu")
    model, _ = load_detector(run, cpu)
    ref = None
    for t in threads:
        torch.set_num_threads(t)
        ips, ref_t = time_torch(model, images, args.batch, cpu, args.warmup)
        res["images_per_s"][f"torch_cpu_{t}t"] = round(ips, 3)
        ref = ref if ref is not None else ref_t
        det = OnnxDetector(path, providers=["CPUExecutionProvider"], threads=t)
        ips_o, out = time_onnx(det, images, args.batch, args.warmup)
        res["images_per_s"][f"ort_cpu_{t}t"] = round(ips_o, 3)
        res["ort_vs_torch"][f"cpu_{t}t"] = round(ips_o / ips, 3)
        res.setdefault("max_score_diff_cpu", max_score_diff(out, ref))
        res.setdefault("mean_detections", round(float(np.mean([len(d["scores"]) for d in out])), 1))

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        model = model.to(gpu)
        ips, _ = time_torch(model, images, args.batch, gpu, args.warmup)
        res["images_per_s"]["torch_cuda"] = round(ips, 3)
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            det = OnnxDetector(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            ips_o, _ = time_onnx(det, images, args.batch, args.warmup)
            res["images_per_s"]["ort_cuda"] = round(ips_o, 3)
            half = export_detector(run, root / "model_fp16.onnx", half=True)
            det = OnnxDetector(half, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            ips_h, _ = time_onnx(det, images, args.batch, args.warmup)
            res["images_per_s"]["ort_cuda_fp16"] = round(ips_h, 3)
            res["ort_vs_torch"]["cuda"] = round(ips_o / ips, 3)
        else:
            res["ort_cuda"] = "skipped: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        res["gpu"] = torch.cuda.get_device_name(0)
    else:
        res["cuda"] = "skipped: no CUDA"

    import onnxruntime as ort

    res.update({"torch": torch.__version__, "onnxruntime": ort.__version__, "cpu": platform.processor() or
                platform.machine(), "cpu_count": os.cpu_count()})
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
