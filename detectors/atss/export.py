"""ATSS deployment: ONNX (or ``.pt2``) export of a trained ATSS run and onnxruntime inference with the same pre-
and post-processing as the PyTorch path. The exporter, writers, metadata, NMS op and session are shared
(``detectors.export``).

The exported detector takes the batch the PyTorch model builds internally (torchvision's
``GeneralizedRCNNTransform``: normalised with the backbone's mean / std, longest side resized to ``img_size``,
padded bottom / right with zeros to a multiple of 32) plus the size of each resized image inside it:

    images       float32 [B, 3, H, W]      H, W multiples of 32 (dynamic=True) or ceil32(img_size) (dynamic=False)
    image_sizes  int64   [B, 2]            (height, width) of the resized image; boxes are clipped to it

and returns, with ``nms=True``, ``boxes [B, K, 4]`` (xyxy in the input's pixels), ``scores [B, K]``,
``labels [B, K]`` (int64) and ``num_detections [B]``, K = detections_per_img, padded rows with score 0 and
label -1. ``image_sizes`` is an input because the PyTorch model clips boxes to the resized image, not to the
padded batch, before NMS; feed ``[H, W]`` for images that fill the input. With ``nms=False`` the input is
``images`` only and the outputs are the raw head outputs, levels P3-P7 concatenated: ``cls_logits [B, A, C]``,
``box_deltas [B, A, 4]``, ``centerness [B, A]`` and ``anchors [A, 4]`` (decode with
``detectors.atss.box_coder.BoxCoder``; weights in the metadata).

Why dynamic height and width: the head's GroupNorm pools statistics over the whole padded map, so the PyTorch
results depend on how far a batch is padded; ``OnnxDetector`` pads exactly as torchvision does (to the batch's
largest side, rounded up to 32), which reproduces the PyTorch detections. A ``dynamic=False`` file is padded
to ``img_size`` square, which changes the scores of non-square images (GroupNorm sees the extra padding).

``half=True`` stores fp16 weights and runs backbone, FPN and head in fp16 (inputs, outputs and
post-processing stay fp32). Only sensible on CUDA (``CUDAExecutionProvider``, TensorRT): the export works on a
CPU and onnxruntime's CPU provider runs the file, but there it is no faster than fp32 (same speed for the tiny
test model) and less exact.

Two details of the trace: it runs at a size where every level (P7 = 1/128) is at least 2 x 2, since
torch.export specialises sizes of 0 and 1 (a 96-px trace would hard-wire a 1 x 1 P7); and timm's TF-"same"
convolutions (EfficientNet-Lite0) get their constant padding for multiple-of-32 inputs, since their
size-dependent padding makes the symbolic shapes grow layer by layer (200 s for the backbone alone).

An ``out`` ending in ``.pt2`` writes the same wrapper as a ``torch.export`` program instead
(``torch.export.load(path).module()(images, image_sizes)``; ``import detectors.export`` first, it registers the
NMS op), with a dynamic batch but a fixed ceil32(img_size) square input: the program checks torch.export's
guards at run time, and with a dynamic height / width those refuse the 1 x 1 levels of small inputs. The
metadata is stored in the archive as ``extra/negvision.json``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detectors.atss.model import ATSS, STRIDES, grid_anchors
from detectors.export import (
    common_metadata,
    export_program,
    fixed_dim,
    nms_keep,
    open_session,
    static_same_padding,
)

DET_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]
RAW_OUTPUTS = ["cls_logits", "box_deltas", "centerness", "anchors"]
MAX_SIDE_BLOCKS = 128  # dynamic height / width: up to 128 x 32 = 4096 pixels

__all__ = ["ATSSExport", "OnnxDetector", "export_detector", "predict_images_onnx"]


# ----------------------------------------------------------------------------- export wrapper
class ATSSExport(nn.Module):
    """ATSS from the normalised, padded batch to fixed-size detections (``nms=True``) or raw head outputs.

    The post-processing is ``ATSS.postprocess`` written over the batch with static shapes: per level the
    candidates (sigmoid(cls) > score_thresh) keep their score sigmoid(cls) * sigmoid(ctr), the others -1; the
    top ``pre_nms_top_n`` of each level are decoded, clipped to the image and dropped when smaller than 0.01;
    class-wise NMS uses torchvision's ``batched_nms`` offset trick (boxes + label * (max coordinate + 1)).

    Args:
        model: a trained ``ATSS`` (its score / NMS settings are used).
        nms: True: boxes / scores / labels / num_detections; False: cls_logits / box_deltas / centerness / anchors.
        half: run backbone, FPN and head in fp16 (inputs, outputs and post-processing stay fp32).
    """

    def __init__(self, model: ATSS, nms: bool = True, half: bool = False) -> None:
        super().__init__()
        self.backbone = static_same_padding(model.backbone)  # inputs are multiples of 32: constant padding
        self.fpn, self.head = model.fpn, model.head
        self.num_classes = model.num_classes
        self.anchor_sizes = model.anchor_sizes
        self.box_coder = model.box_coder
        self.score_thresh, self.nms_thresh = float(model.score_thresh), float(model.nms_thresh)
        self.pre_nms_top_n, self.detections_per_img = int(model.pre_nms_top_n), int(model.detections_per_img)
        self.nms = nms
        self.half_precision = half

    def raw(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
        """Per level: cls [B, A_l, C], box deltas [B, A_l, 4], centerness [B, A_l] (fp32); anchors [A, 4]."""
        x = images.half() if self.half_precision else images
        feats = self.fpn(self.backbone(x))
        cls, box, ctr = self.head(feats)
        n, C = images.shape[0], self.num_classes
        anchors = grid_anchors([(f.shape[-2], f.shape[-1]) for f in feats], STRIDES, self.anchor_sizes,
                               device=images.device)
        cls = [c.permute(0, 2, 3, 1).reshape(n, -1, C).float() for c in cls]
        box = [b.permute(0, 2, 3, 1).reshape(n, -1, 4).float() for b in box]
        ctr = [c.permute(0, 2, 3, 1).reshape(n, -1).float() for c in ctr]
        return cls, box, ctr, anchors

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        cls, box, ctr, anchors = self.raw(images)
        if not self.nms:
            return torch.cat(cls, 1), torch.cat(box, 1), torch.cat(ctr, 1), anchors
        if image_sizes is None:
            raise ValueError("ATSSExport with nms=True needs image_sizes [B, 2] (height, width of each image)")
        n, C, k = images.shape[0], self.num_classes, self.pre_nms_top_n
        h_img = image_sizes[:, 0].to(torch.float32)[:, None, None]
        w_img = image_sizes[:, 1].to(torch.float32)[:, None, None]
        all_boxes, all_scores, all_labels = [], [], []
        start = 0
        for c, b, t in zip(cls, box, ctr, strict=True):
            a_l = c.shape[1]
            anc = anchors[start:start + a_l]
            start = start + a_l
            prob = c.sigmoid()
            score = prob * t.sigmoid()[:, :, None]  # score = sigmoid(cls) * sigmoid(ctr)
            score = torch.where(prob > self.score_thresh, score, -1.0).reshape(n, -1)
            # pad with k non-candidates so that topk(k) is static whatever the level's size
            score = torch.cat([score, score.new_full((n, k), -1.0)], 1)
            top_s, top_i = score.topk(k, dim=1)
            a_idx = torch.clamp(torch.div(top_i, C, rounding_mode="floor"), max=a_l - 1)
            labels = top_i % C
            deltas = torch.gather(b, 1, a_idx[:, :, None].expand(-1, -1, 4))
            boxes = self.box_coder.decode_single(deltas.reshape(-1, 4), anc[a_idx.reshape(-1)]).reshape(n, -1, 4)
            xs = torch.minimum(boxes[:, :, 0::2].clamp(min=0), w_img)  # clip_boxes_to_image
            ys = torch.minimum(boxes[:, :, 1::2].clamp(min=0), h_img)
            boxes = torch.stack((xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]), dim=2)
            ok = (top_s >= 0) & (boxes[..., 2] - boxes[..., 0] >= 1e-2) & (boxes[..., 3] - boxes[..., 1] >= 1e-2)
            all_boxes.append(boxes)
            all_scores.append(torch.where(ok, top_s, -1.0))
            all_labels.append(labels)
        boxes, scores, labels = torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)
        # batched_nms: boxes of different classes never overlap once shifted by label * (max coordinate + 1)
        max_coord = torch.where((scores >= 0)[..., None], boxes, 0.0).amax(dim=(1, 2))
        offsets = labels.to(boxes.dtype) * (max_coord[:, None] + 1)
        keep = nms_keep(boxes + offsets[..., None], scores, self.nms_thresh)
        final = torch.where(keep, scores, -1.0)
        top_s, top_i = final.topk(min(self.detections_per_img, final.shape[1]), dim=1)
        det = top_s >= 0
        out_boxes = torch.gather(boxes, 1, top_i[:, :, None].expand(-1, -1, 4)) * det[..., None].to(boxes.dtype)
        out_scores = torch.where(det, top_s, 0.0)
        out_labels = torch.where(det, torch.gather(labels, 1, top_i), -1)
        pad = self.detections_per_img - top_s.shape[1]
        if pad > 0:  # fewer candidates than detections_per_img in all: pad to K
            out_boxes = torch.cat([out_boxes, out_boxes.new_zeros((n, pad, 4))], 1)
            out_scores = torch.cat([out_scores, out_scores.new_zeros((n, pad))], 1)
            out_labels = torch.cat([out_labels, out_labels.new_full((n, pad), -1)], 1)
        return out_boxes, out_scores, out_labels, det.sum(1)


# ----------------------------------------------------------------------------- export
def _ceil_to(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


def export_detector(weights: str | Path, out: str | Path, img_size: int | None = None, dynamic: bool = True,
                    half: bool = False, opset: int = 18, nms: bool = True, simplify: bool = False,
                    batch: int = 1) -> Path:
    """Export a trained ATSS run (run folder, checkpoint or weights file) to ONNX (or ``.pt2``); returns ``out``.

    Args:
        weights: what ``detectors.detect.load_detector`` takes.
        out: the ``.onnx`` file to write (``.pt2``: a torch.export program instead).
        img_size: longest side the images are resized to (default: the run's ``max_size``, its --img-size).
        dynamic: dynamic batch, height and width (multiples of 32); False: fixed [batch, 3, S, S], S =
            img_size rounded up to 32.
        half: fp16 weights and graph (for CUDA; see the module docstring).
        opset: ONNX opset (18 or later).
        nms: in-graph NMS and fixed-size detections (True) or the raw head outputs (False).
        simplify: run onnxslim (else onnx-simplifier) on the result.
        batch: the fixed batch size of a ``dynamic=False`` export.
    """
    from detectors.detect import find_weights_file, load_detector

    model, spec = load_detector(weights, "cpu")
    if not isinstance(model, ATSS):
        raise ValueError(f"{weights}: export supports ATSS detectors; this run is a '{spec.get('model')}'")
    size = int(img_size or spec["kwargs"].get("max_size", model.transform.max_size))
    div = int(model.transform.size_divisible)
    side = _ceil_to(size, div)
    wrapper = ATSSExport(model, nms=nms, half=half).eval()
    if half:
        wrapper = wrapper.half()
    pt2 = Path(out).suffix == ".pt2"
    dynamic_hw = dynamic and not pt2
    n = 2 if dynamic else batch
    # trace at a size where every level (P7 = 1/128) is at least 2 x 2: torch.export specialises sizes of 0 and 1
    example = max(side, 8 * div) if dynamic_hw else side
    images = torch.randn(n, 3, example, example)
    args: tuple = (images, torch.full((n, 2), size, dtype=torch.int64)) if nms else (images,)
    shapes: Any = None
    if dynamic:
        b = torch.export.Dim("batch", min=1, max=1024)
        shapes = {"images": {0: b}}
        if dynamic_hw:
            hb = torch.export.Dim("height_div32", min=1, max=MAX_SIDE_BLOCKS)
            wb = torch.export.Dim("width_div32", min=1, max=MAX_SIDE_BLOCKS)
            shapes["images"].update({2: div * hb, 3: div * wb})
        if nms:
            shapes["image_sizes"] = {0: b}
    meta = common_metadata("detect", find_weights_file(weights), opset, half, dynamic)
    meta.update({
        "model": spec.get("model", "atss"), "classes": list(spec["classes"]), "img_size": size,
        "input_size": None if dynamic_hw else [side, side], "size_divisible": div,
        "mean": list(model.transform.image_mean), "std": list(model.transform.image_std),
        "score_thresh": wrapper.score_thresh, "nms_thresh": wrapper.nms_thresh,
        "pre_nms_top_n": wrapper.pre_nms_top_n, "detections_per_img": wrapper.detections_per_img,
        "nms": nms, "box_coder_weights": list(model.box_coder.weights), "bbox_xform_clip": model.box_coder.clip,
        "inputs": ["images", "image_sizes"] if nms else ["images"], "outputs": DET_OUTPUTS if nms else RAW_OUTPUTS,
    })
    return export_program(wrapper, args, meta["inputs"], meta["outputs"], shapes, Path(out), meta, opset,
                          simplify)


# ----------------------------------------------------------------------------- onnxruntime inference
class OnnxDetector:
    """An exported detector in onnxruntime; ``predict`` takes HWC uint8 RGB arrays and returns the PyTorch path's
    ``[{"boxes", "scores", "labels"}]`` (numpy; boxes xyxy in original image coordinates).

    Args:
        path: the ``.onnx`` file written by ``export_detector``.
        providers: onnxruntime providers (default: CUDA when available, else CPU).
        threads: intra-op threads of the CPU provider (default: onnxruntime's choice).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.path = Path(path)
        self.session, self.meta = open_session(path, providers, threads, "detect", "a detector")
        m = self.meta
        self.classes: list[str] = list(m["classes"])
        self.img_size = int(m["img_size"])
        self.nms = bool(m.get("nms", True))
        self.score_thresh = float(m["score_thresh"])
        # torchvision's own resize / normalise / pad: the same pixels as the PyTorch model's transform
        self.transform = GeneralizedRCNNTransform(self.img_size, self.img_size, list(m["mean"]), list(m["std"]),
                                                  size_divisible=int(m.get("size_divisible", 32))).eval()
        inp = self.session.get_inputs()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = fixed_dim(inp.shape[0])
        self.fixed_hw = (fixed_dim(inp.shape[2]), fixed_dim(inp.shape[3]))
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def preprocess(self, images: Sequence[Any]) -> tuple[np.ndarray, list[tuple[int, int]], list[tuple[int, int]]]:
        """(batch [B, 3, H, W], resized sizes, original sizes) from HWC uint8 RGB arrays, as the PyTorch model."""
        tensors, originals = [], []
        for i, im in enumerate(images):
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"image {i}: expected an HWC RGB array, got shape {tuple(a.shape)}")
            t = torch.from_numpy(np.array(a)).permute(2, 0, 1)  # a copy: the input may be read-only
            tensors.append(t.float().div(255) if a.dtype == np.uint8 else t.float())
            originals.append((int(a.shape[0]), int(a.shape[1])))
        with torch.no_grad():
            batch, _ = self.transform(tensors)
        x = batch.tensors
        fh, fw = self.fixed_hw
        if fh is not None and fw is not None:  # a fixed-size export: pad to its square input
            if x.shape[-2] > fh or x.shape[-1] > fw:
                raise ValueError(f"{self.path}: resized batch {tuple(x.shape[-2:])} exceeds the input size ({fh}, {fw})")
            x = torch.nn.functional.pad(x, (0, fw - x.shape[-1], 0, fh - x.shape[-2]))
        return x.numpy(), [tuple(s) for s in batch.image_sizes], originals

    def _run_exact(self, x: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        feed = {self.input_names[0]: x.astype(self.input_dtype, copy=False)}
        if len(self.input_names) > 1:
            feed[self.input_names[1]] = sizes
        return self.session.run(None, feed)

    def _run(self, x: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        """Session outputs for the batch ``x``; a fixed-batch export runs in chunks, the last one zero-padded."""
        n, fb = x.shape[0], self.fixed_batch
        if fb is None or fb == n:
            return self._run_exact(x, sizes)
        parts: list[tuple[int, list[np.ndarray]]] = []
        for i in range(0, n, fb):
            xs, ss = x[i:i + fb], sizes[i:i + fb]
            m = xs.shape[0]
            if m < fb:
                xs = np.concatenate([xs, np.zeros((fb - m, *xs.shape[1:]), xs.dtype)])
                ss = np.concatenate([ss, np.repeat(ss[:1], fb - m, 0)])
            parts.append((m, self._run_exact(xs, ss)))
        return [parts[0][1][j] if name == "anchors" else np.concatenate([o[j][:m] for m, o in parts])
                for j, name in enumerate(self.output_names)]

    def _postprocess_raw(self, outs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """ATSS.postprocess on the raw outputs of an ``nms=False`` export (the PyTorch code itself)."""
        from detectors.atss.box_coder import BoxCoder

        cls, box, ctr, anchors = (torch.from_numpy(np.asarray(o)) for o in outs)
        widths = (anchors[:, 2] - anchors[:, 0]).tolist()
        num_per_level, last = [], None
        for wv in widths:  # one anchor size per level: consecutive runs of equal width are the levels
            if wv != last:
                num_per_level.append(0)
                last = wv
            num_per_level[-1] += 1
        m = self.meta
        ns = types.SimpleNamespace(num_classes=len(self.classes), score_thresh=float(m["score_thresh"]),
                                   nms_thresh=float(m["nms_thresh"]), pre_nms_top_n=int(m["pre_nms_top_n"]),
                                   detections_per_img=int(m["detections_per_img"]),
                                   box_coder=BoxCoder(tuple(m["box_coder_weights"]), float(m["bbox_xform_clip"])))
        return ATSS.postprocess(ns, cls, box, ctr, anchors, num_per_level, sizes)  # type: ignore[arg-type]

    def predict(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Detections per image: boxes [N, 4] float32 (xyxy, original pixels), scores [N] float32, labels [N] int64."""
        from torchvision.models.detection.transform import resize_boxes

        if len(images) == 0:
            return []
        x, sizes, originals = self.preprocess(images)
        size_arr = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        outs = self._run(x, size_arr)
        if self.nms:
            boxes, scores, labels, num = outs
            dets = [{"boxes": torch.from_numpy(np.asarray(boxes[i, :int(num[i])], np.float32)),
                     "scores": torch.from_numpy(np.asarray(scores[i, :int(num[i])], np.float32)),
                     "labels": torch.from_numpy(np.asarray(labels[i, :int(num[i])], np.int64))}
                    for i in range(len(sizes))]
        else:
            dets = self._postprocess_raw(outs, sizes)
        results = []
        for d, s, o in zip(dets, sizes, originals, strict=True):
            b = resize_boxes(d["boxes"].float(), s, o)  # torchvision's own mapping back to the original image
            results.append({"boxes": b.numpy().astype(np.float32), "scores": d["scores"].numpy().astype(np.float32),
                            "labels": d["labels"].numpy().astype(np.int64)})
        return results

    __call__ = predict


# ----------------------------------------------------------------------------- folder prediction
# Copied from detectors.detect.predict_images (the same files and fields), with the model swapped for onnxruntime
def predict_images_onnx(model_path: str | Path, source: str | Path | list[Path], out: str | Path, *,
                        score_thresh: float = 0.3, batch: int = 4, draw: bool = True, skip_bad: bool = False,
                        providers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``detectors.detect.predict_images`` with an exported ``.onnx`` detector: one JSON per image and (optionally)
    the image with boxes drawn; same names, fields and bad-image policy."""
    from detectors.detect import write_detections
    from vision.engine.run import write_skipped
    from vision.io import list_images, open_image_or_skip, output_names

    det = OnnxDetector(model_path, providers=providers)
    classes = det.classes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in source] if isinstance(source, (list, tuple)) else list_images(source)
    names = output_names(files, None if isinstance(source, (list, tuple)) else source)
    results, skipped = [], []
    for i in range(0, len(files), batch):
        chunk, stems, arrs = [], [], []
        for f, stem in zip(files[i:i + batch], names[i:i + batch], strict=True):
            pil = open_image_or_skip(f, "RGB", skip_bad, skipped)
            if pil is None:
                continue
            chunk.append(f)
            stems.append(stem)
            arrs.append(np.asarray(pil))
        if not chunk:
            continue
        dets = det.predict(arrs)
        for f, stem, arr, d in zip(chunk, stems, arrs, dets, strict=True):
            results.append(write_detections(out, f, stem, arr, int(arr.shape[1]), int(arr.shape[0]), d, classes,
                                            score_thresh, draw))
    write_skipped(out, {"predict": skipped})
    return results
