"""Export parts shared by every detector's ``export`` module (``detectors/atss/export.py``,
``detectors/segdec/export.py``): the exporter call and the file writers, the metadata every exported file carries,
the NMS op that exports, the constant-padding rewrite of timm's TF-"same" layers, and the onnxruntime session.
Nothing here knows a model; the model packages import this module, never the other way round.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), which handles the whole graph
here, dynamic batch / height / width included. The one op without a stock translation is the batched,
class-wise NMS: it is the custom op ``negvision::nms_keep`` (eager: ``torchvision.ops.nms`` per image),
translated to ONNX ``NonMaxSuppression`` over the batch dimension plus a ``ScatterND`` that turns the selected
indices back into a fixed-size keep mask, so every tensor after it has a static size (no data-dependent shapes
reach torch.export). The legacy TorchScript exporter (``dynamo=False``) is not needed and not used; it is faster
to run (about 3 s against 20 s for the tiny test model on one CPU core), but would need a second NMS path.

An ``out`` ending in ``.pt2`` writes a ``torch.export`` program instead, with the metadata stored in the archive
as ``extra/negvision.json``; ``import detectors.export`` before ``torch.export.load``: it registers the NMS op.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

FORMAT = "negvision.onnx"
FORMAT_VERSION = "1"
INSTALL_HINT = "pip install 'negvision[export]'"

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INSTALL_HINT",
    "common_metadata",
    "export_program",
    "fixed_dim",
    "nms_keep",
    "open_session",
    "read_metadata",
    "static_same_padding",
]


def _require_onnx(runtime: bool = True, exporter: bool = False) -> Any:
    """Import onnx (+ onnxruntime / onnxscript); an ImportError saying how to install them otherwise."""
    names = ["onnx"] + (["onnxruntime"] if runtime else []) + (["onnxscript"] if exporter else [])
    try:
        mods = [__import__(n) for n in names]
    except ImportError as e:
        raise ImportError(f"ONNX export / inference needs {', '.join(names)} ({e}); {INSTALL_HINT}") from None
    return mods


# ----------------------------------------------------------------------------- NMS that exports
@torch.library.custom_op("negvision::nms_keep", mutates_args=())
def nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Keep mask [B, N] of NMS run per image on ``boxes`` [B, N, 4] (xyxy) / ``scores`` [B, N]; entries with a
    negative score take no part. Exports to ONNX NonMaxSuppression (see ``_nms_keep_onnx``)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for b in range(scores.shape[0]):
        valid = torch.nonzero(scores[b] >= 0).squeeze(1)
        k = torchvision.ops.nms(boxes[b, valid].float(), scores[b, valid].float(), iou_threshold)
        keep[b, valid[k]] = True
    return keep


@nms_keep.register_fake
def _nms_keep_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _nms_keep_onnx(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """ONNX translation of ``nms_keep``: NonMaxSuppression over the batch (one 'class'), indices -> keep mask."""
    from onnx import TensorProto, helper
    from onnxscript import opset18 as op

    max_out = op.Constant(value=helper.make_tensor("max_out", TensorProto.INT64, [1], [2**62]))
    sel = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, [1]), max_out, op.Constant(value_float=iou_threshold),
                               op.Constant(value_float=-0.5))  # [M, 3] (batch, class, box); negatives excluded
    idx = op.Concat(op.Slice(sel, [0], [1], [1]), op.Slice(sel, [2], [3], [1]), axis=1)
    ones = op.ConstantOfShape(op.Shape(sel, start=0, end=1),
                              value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    return op.Cast(op.ScatterND(op.ConstantOfShape(op.Shape(scores)), idx, ones), to=TensorProto.BOOL)


# ----------------------------------------------------------------------------- TF-"same" padding as a constant
class _StaticSamePad(nn.Module):
    """timm's TF-"same" ``Conv2dSame`` / ``MaxPool2dSame`` with constant padding: for inputs divisible by the layer's
    stride (any multiple of 32 up to C5) the "same" padding is max((k - 1) d + 1 - s, 0) whatever the size, and a
    constant keeps torch.export from tracing size-dependent padding, whose symbolic shapes grow with every layer
    (minutes for EfficientNet-Lite0 with dynamic height and width)."""

    def __init__(self, inner: nn.Module, pool: bool) -> None:
        super().__init__()
        self.inner, self.pool = inner, pool
        k = tuple(inner.kernel_size) if pool else tuple(inner.weight.shape[-2:])
        s, d = tuple(inner.stride), tuple(inner.dilation)
        ph, pw = (max((k[i] - 1) * d[i] + 1 - s[i], 0) for i in range(2))
        self.pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # as timm's pad_same: the extra pixel after

    def forward(self, x: Tensor) -> Tensor:
        m = self.inner
        x = torch.nn.functional.pad(x, self.pad, value=-float("inf") if self.pool else 0.0)
        if self.pool:
            return torch.nn.functional.max_pool2d(x, m.kernel_size, m.stride, 0, m.dilation, m.ceil_mode)
        return torch.nn.functional.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)


def static_same_padding(module: nn.Module) -> nn.Module:
    """``module`` with every timm Conv2dSame / MaxPool2dSame wrapped in ``_StaticSamePad`` (a copy when any)."""
    import copy

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.pool2d_same import MaxPool2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return module
    if not any(isinstance(m, (Conv2dSame, MaxPool2dSame)) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Conv2dSame, MaxPool2dSame)):
                setattr(parent, name, _StaticSamePad(child, pool=isinstance(child, MaxPool2dSame)))
    return module


# ----------------------------------------------------------------------------- writing files
def _simplifier() -> Any:
    """onnxslim, else onnx-simplifier; ImportError saying how to get one when neither is installed."""
    import importlib

    for name in ("onnxslim", "onnxsim"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("simplify needs onnxslim (pip install onnxslim) or onnx-simplifier (pip install onnxsim); "
                      "without it the exporter's own optimizer has already folded constants")


def _simplify(proto: Any, out: Path) -> Any:
    """The model after onnxslim (else onnx-simplifier)."""
    tool = _simplifier()
    if tool.__name__ == "onnxslim":
        return tool.slim(proto)
    proto, ok = tool.simplify(proto)
    if not ok:
        raise ValueError(f"{out}: onnx-simplifier could not validate the simplified model")
    return proto


def _write_onnx(program: Any, out: Path, metadata: dict[str, Any], simplify: bool) -> Path:
    """Add ``metadata`` to the exported model, optionally simplify, check with onnx.checker, write atomically."""
    import onnx

    from vision.io import write_bytes_atomic

    proto = program.model_proto
    if simplify:
        proto = _simplify(proto, out)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    if proto.ByteSize() >= 2**31:
        raise ValueError(f"{out}: the model is over 2 GB, which one .onnx file cannot hold")
    onnx.checker.check_model(proto)
    write_bytes_atomic(out, proto.SerializeToString())
    return out


def _write_pt2(module: nn.Module, args: tuple, dynamic_shapes: Any, out: Path, metadata: dict[str, Any]) -> Path:
    """``torch.export`` program of ``module`` with the metadata as an extra file; written atomically."""
    import io

    from vision.io import write_bytes_atomic

    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={"negvision.json": json.dumps(metadata)})
    write_bytes_atomic(out, buf.getvalue())
    return out


def export_program(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                   dynamic_shapes: Any, out: Path, metadata: dict[str, Any], opset: int, simplify: bool) -> Path:
    """Export ``module`` called with ``args`` to ``out``: ONNX (the NMS op translated, ``metadata`` in its
    ``metadata_props``, checked, optionally simplified) or, for a ``.pt2`` name, a torch.export program."""
    out = Path(out)
    if out.suffix != ".pt2":
        _require_onnx(runtime=False, exporter=True)
        if opset < 17:
            raise ValueError(f"opset {opset}: the exporter needs opset 17 or later (18 is the default)")
        if simplify:
            _simplifier()  # before the export, which takes a while
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (torch.export; about half a minute on a CPU)", out)
    t0 = time.perf_counter()
    with torch.no_grad():
        if out.suffix == ".pt2":
            path = _write_pt2(module, args, dynamic_shapes, out, metadata)
        else:
            with warnings.catch_warnings():  # images and image_sizes share the batch Dim: a harmless notice
                warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
                program = torch.onnx.export(
                    module, args, dynamo=True, opset_version=opset, input_names=input_names,
                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                    custom_translation_table={torch.ops.negvision.nms_keep.default: _nms_keep_onnx})
            path = _write_onnx(program, out, metadata, simplify)
    log.debug("exported %s in %.1f s (%.1f MB)", path, time.perf_counter() - t0, path.stat().st_size / 2**20)
    return path


def common_metadata(task: str, source: Path, opset: int, half: bool, dynamic: bool) -> dict[str, Any]:
    """The metadata every exported file carries (format, version, task, source weights, exporter, opset, ...)."""
    return {"negvision_format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "source": str(source),
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "opset": opset,
            "half": half, "dynamic": dynamic}


# ----------------------------------------------------------------------------- onnxruntime inference
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The negvision metadata of an exported ``.onnx`` file (values JSON-decoded); ValueError naming the file when
    it is not a readable ONNX model or has none."""
    onnx = _require_onnx(runtime=False)[0]
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: ONNX file not found")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ValueError(f"{p}: not a readable ONNX model ({type(e).__name__}: {_one_line(e)})") from None
    return _decode_meta(p, {m.key: m.value for m in proto.metadata_props})


def _decode_meta(p: Path, raw: dict[str, str]) -> dict[str, Any]:
    if raw.get("negvision_format") != FORMAT:
        raise ValueError(f"{p}: no negvision metadata (not written by 'negvision detect export' / 'negvision defect "
                         "export'); re-export the run with negvision")
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    meta["negvision_format"], meta["format_version"] = raw["negvision_format"], raw.get("format_version", "")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{p}: negvision ONNX format version {meta['format_version']!r}, this negvision reads "
                         f"{FORMAT_VERSION!r}; re-export the run")
    return meta


def _cuda_available(ort: Any) -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def open_session(path: str | Path, providers: Sequence[str] | None, threads: int | None, task: str,
                 expected: str) -> tuple[Any, dict[str, Any]]:
    """(onnxruntime session, metadata) of an exported file of ``task`` ("detect", "segdec"); one-line ValueError
    naming it when it is unusable or another task's (``expected`` says what it should be: "a detector")."""
    _, ort = _require_onnx()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: ONNX file not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if providers is None:
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if _cuda_available(ort)
                     else ["CPUExecutionProvider"])
    try:
        sess = ort.InferenceSession(str(p), sess_options=opts, providers=list(providers))
    except Exception as e:
        raise ValueError(f"{p}: cannot load the ONNX model ({type(e).__name__}: {_one_line(e)})") from None
    meta = _decode_meta(p, dict(sess.get_modelmeta().custom_metadata_map))
    if meta.get("task") != task:
        raise ValueError(f"{p}: exported {meta.get('task')!r} model, expected {expected}")
    if meta.get("half") and "CUDAExecutionProvider" not in sess.get_providers():
        log.warning("%s is an fp16 export, meant for the CUDA provider; on the CPU an fp32 export (without "
                    "--half) is the one to use", p)
    return sess, meta


def fixed_dim(dim: Any) -> int | None:
    """A session input's dimension when it is fixed, None when it is dynamic (a name or unknown)."""
    return dim if isinstance(dim, int) and dim > 0 else None
