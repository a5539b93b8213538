"""SegDecNet (and PatchCore, ``negvision defect train --method patchcore``) deployment: ONNX (or ``.pt2``) export of a
trained run and onnxruntime inference with the pre-processing of ``negvision defect predict``. The exporter,
writers, metadata and session are shared (``detectors.export``).

The exported graph takes ``[B, C, H, W]`` in 0..1 at the run's img_size (dynamic batch by default) and returns
``decision_logits [B]`` and ``seg_logits [B, 1, H/8, W/8]`` in fp32; the image size, channels and the run's
decision threshold are in the file's metadata. ``half=True`` runs the network in fp16 (for the CUDA provider).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detectors.export import common_metadata, export_program, fixed_dim, open_session

SEGDEC_OUTPUTS = ["decision_logits", "seg_logits"]

__all__ = ["OnnxSegDec", "SegDecExport", "export_segdec", "predict_segdec_onnx"]


# ----------------------------------------------------------------------------- export
class SegDecExport(nn.Module):
    """SegDecNet with fp32 outputs: ``forward(x [B, C, H, W] in 0..1) -> (decision_logits [B], seg_logits [B, 1,
    H/8, W/8])``; ``half`` runs the network in fp16."""

    def __init__(self, model: nn.Module, half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.half_precision = half

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dec, seg = self.model(x.half() if self.half_precision else x)
        return dec.float(), seg.float()


def export_segdec(weights: str | Path, out: str | Path, dynamic: bool = True, half: bool = False, opset: int = 18,
                  simplify: bool = False, batch: int = 1) -> Path:
    """Export a trained SegDecNet (or PatchCore) run to ONNX (or ``.pt2``): input ``[B, C, H, W]`` in 0..1 at the
    run's img_size, outputs ``decision_logits [B]`` and ``seg_logits [B, 1, H/8, W/8]``; ``dynamic``: the batch."""
    from .predict import run_threshold
    from .spec import find_weights_file, load_segdec

    model, spec = load_segdec(weights, "cpu")
    h, w = (int(v) for v in spec["img_size"])
    channels = int(model.in_channels)
    wrapper = SegDecExport(model, half=half).eval()
    if half:
        wrapper = wrapper.half()
    n = 2 if dynamic else batch
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    meta = common_metadata("segdec", find_weights_file(weights), opset, half, dynamic)
    meta.update({"img_size": [h, w], "channels": channels, "model": model.config, "inputs": ["images"],
                 "outputs": SEGDEC_OUTPUTS})
    thr = run_threshold(Path(weights), spec)
    if thr is not None:
        meta["threshold"] = thr
    return export_program(wrapper, (torch.rand(n, channels, h, w),), ["images"], SEGDEC_OUTPUTS, shapes, Path(out),
                          meta, opset, simplify)


# ----------------------------------------------------------------------------- onnxruntime inference
class OnnxSegDec:
    """An exported SegDecNet in onnxruntime; ``predict`` takes uint8 arrays (HW grey or HWC RGB, any size) and
    returns per image the defect probability and the segmentation probability at the image's size, with the
    pre-processing of ``negvision defect predict`` (PIL bilinear resize to the run's img_size, / 255).

    Args:
        path: the ``.onnx`` file written by ``export_segdec``.
        providers: onnxruntime providers (default: CUDA when available, else CPU).
        threads: intra-op threads of the CPU provider.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session, self.meta = open_session(path, providers, threads, "segdec", "a SegDecNet")
        self.img_size = tuple(int(v) for v in self.meta["img_size"])  # (height, width)
        self.channels = int(self.meta["channels"])
        self.threshold = float(self.meta.get("threshold", 0.5))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = fixed_dim(inp.shape[0])
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """[B, C, H, W] float32 in 0..1 from PIL images or uint8 arrays."""
        from PIL import Image

        h, w = self.img_size
        mode = "L" if self.channels == 1 else "RGB"
        out = []
        for im in images:
            pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            if pil.mode != mode:
                pil = pil.convert(mode)
            small = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            out.append(small[None] if mode == "L" else small.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(out))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(decision_logits [B], seg_logits [B, 1, H/8, W/8]) of a preprocessed batch."""
        fb, n = self.fixed_batch, x.shape[0]
        if fb is None or fb == n:
            dec, seg = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})
            return dec, seg
        decs, segs = [], []
        for i in range(0, n, fb):
            xs = x[i:i + fb]
            m = xs.shape[0]
            if m < fb:
                xs = np.concatenate([xs, np.zeros((fb - m, *xs.shape[1:]), xs.dtype)])
            d, s = self.session.run(None, {self.input_name: xs.astype(self.input_dtype, copy=False)})
            decs.append(d[:m])
            segs.append(s[:m])
        return np.concatenate(decs), np.concatenate(segs)

    def predict(self, images: Sequence[Any]) -> list[dict[str, Any]]:
        """Per image: probability, decision_logit, defective (probability >= the run's threshold) and ``seg``, the
        segmentation probability [H0, W0] upsampled to the image's own size."""
        from .evaluate import upsample_map

        if len(images) == 0:
            return []
        dec, seg = self.run(self.preprocess(images))
        prob = 1.0 / (1.0 + np.exp(-dec.astype(np.float64)))
        seg_p = torch.sigmoid(torch.from_numpy(np.asarray(seg, np.float32)))[:, 0].numpy()
        res = []
        for im, d, p, sp in zip(images, dec, prob, seg_p, strict=True):
            size = (im.height, im.width) if hasattr(im, "height") else tuple(np.asarray(im).shape[:2])
            res.append({"probability": float(p), "decision_logit": float(d), "defective": bool(p >= self.threshold),
                        "seg": upsample_map(sp, size)})
        return res

    __call__ = predict


# ----------------------------------------------------------------------------- folder prediction
# The loop of detectors.segdec.predict.predict_segdec with onnxruntime as the model; the files come from its writers
def predict_segdec_onnx(model_path: str | Path, source: str | Path, out: str | Path, *, threshold: float | None = None,
                        seg_threshold: float = 0.5, batch: int = 4, heatmaps: bool = True, skip_bad: bool = False,
                        providers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``detectors.segdec.predict.predict_segdec`` with an exported ``.onnx`` SegDecNet: predictions.csv / .json,
    mask PNGs and heatmaps; ``threshold`` defaults to the one stored at export (the run's best-F1), else 0.5."""
    from vision.io import list_images, open_image_or_skip, output_names

    from .predict import write_defect_prediction, write_prediction_summary

    net = OnnxSegDec(model_path, providers=providers)
    thr = net.threshold if threshold is None else float(threshold)
    grey = net.channels == 1
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if heatmaps:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    names = dict(zip(files, output_names(files, source), strict=True))
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i in range(0, len(files), batch):
        chunk, originals = [], []
        for f in files[i:i + batch]:
            im = open_image_or_skip(f, "L" if grey else "RGB", skip_bad, skipped)
            if im is None:
                continue
            chunk.append(f)
            originals.append(im)
        if not chunk:
            continue
        preds = net.predict(originals)
        for f, im, p in zip(chunk, originals, preds, strict=True):
            results.append(write_defect_prediction(out, f, names[f].as_posix(), np.asarray(im), p["seg"],
                                                   float(p["probability"]), thr, seg_threshold, heatmaps))
    write_prediction_summary(out, results, thr, seg_threshold, skipped, "segmentation" if heatmaps else None)
    return results
