"""SegDecNet losses: distance-weighted segmentation targets, dynamic balancing of the two losses.

Mixed supervision: samples without a pixel mask (image-level label only) contribute the decision loss only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

__all__ = [
    "DOWNSAMPLE",
    "dilate_mask",
    "distance_weights",
    "downsample_mask",
    "loss_weights",
    "segdec_loss",
    "segmentation_targets",
]

DOWNSAMPLE = 8


def _as_2d(mask: Any, name: str = "mask") -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (H, W) (singleton dims allowed), got shape {np.shape(mask)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr.astype(np.float32, copy=False)


def dilate_mask(mask: Any, size: int) -> np.ndarray:
    """Grey dilation with a ``size`` x ``size`` square (official ``DILATE``; ``size <= 1`` leaves the mask as is)."""
    m = _as_2d(mask)
    if size is None or int(size) <= 1:
        return m.copy()
    return ndimage.grey_dilation(m, size=(int(size), int(size)), mode="constant", cval=0.0)


def distance_weights(mask: Any, p: float = 1.0, w_pos: float = 1.0, dilate: int = 1) -> Any:
    """Per-pixel segmentation-loss weights: positives ``w_pos * (EDT / max EDT) ** p``, background 1.

    EDT is the Euclidean distance of a positive pixel (mask > 0) to the nearest background pixel
    (``scipy.ndimage.distance_transform_edt``); an all-background mask gives all ones. ``dilate`` > 1
    dilates the mask first. Returns a float32 array (a tensor if ``mask`` is a tensor) of the mask's shape.
    """
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    if w_pos <= 0:
        raise ValueError(f"w_pos must be > 0, got {w_pos}")
    shape = tuple(mask.shape) if hasattr(mask, "shape") else np.shape(mask)
    m = dilate_mask(mask, dilate)
    edt = ndimage.distance_transform_edt(m > 0)
    out = np.ones_like(m, dtype=np.float32)
    top = float(edt.max())
    if top > 0:
        pos = m > 0
        out[pos] = ((edt[pos] / top) ** p * w_pos).astype(np.float32)  # (EDT / max EDT)^p * w_pos
    out = out.reshape(shape)
    if isinstance(mask, Tensor):
        return torch.from_numpy(out).to(mask.device)
    return out


def downsample_mask(x: Any, factor: int = DOWNSAMPLE) -> Any:
    """Soft x``factor`` downsampling as the official code: reflection pad by ``factor``, then average pooling
    with a ``2 * factor + 1`` window and stride ``factor``. Takes [H, W], [C, H, W] or [B, C, H, W]
    (numpy or tensor); H and W must be divisible by ``factor``. Small maps (side <= factor) pad by replication.
    Like the official code, output cell (i, j) averages the window centred on input pixel (8i, 8j).
    """
    is_np = not isinstance(x, Tensor)
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if is_np else x.float()
    nd = t.dim()
    if nd not in (2, 3, 4):
        raise ValueError(f"downsample_mask expects [H, W], [C, H, W] or [B, C, H, W], got shape {tuple(t.shape)}")
    h, w = t.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"mask size {h}x{w} (HxW) is not divisible by {factor}")
    t4 = t.reshape(-1, 1, h, w)
    mode = "reflect" if min(h, w) > factor else "replicate"
    t4 = F.pad(t4, (factor, factor, factor, factor), mode=mode)
    y = F.avg_pool2d(t4, kernel_size=2 * factor + 1, stride=factor)
    y = y.reshape(*t.shape[:-2], h // factor, w // factor)
    return y.numpy() if is_np else y


def segmentation_targets(
    mask: Any, *, weighted: bool = True, p: float = 1.0, w_pos: float = 1.0, factor: int = DOWNSAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Soft target and loss weights at 1/``factor`` resolution from a (dilated, resized) full-size mask."""
    m = _as_2d(mask)
    wts = distance_weights(m, p, w_pos) if weighted else np.ones_like(m)
    return downsample_mask(m, factor), downsample_mask(wts, factor)


def loss_weights(epoch: float, total_epochs: float, delta: float, dynamic: bool = True) -> tuple[float, float]:
    """(w_seg, w_dec) of the total loss ``w_seg * L_seg + w_dec * L_dec``.

    Dynamic balancing: lambda = 1 - epoch / total_epochs (epoch 0-based), w_seg = lambda,
    w_dec = delta * (1 - lambda). Not dynamic: (1, delta).
    """
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if not dynamic:
        return 1.0, float(delta)
    if not 0 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}], got {epoch}")
    lam = 1.0 - float(epoch) / float(total_epochs)  # lambda = 1 - epoch / total_epochs
    return lam, float(delta) * (1.0 - lam)


def segdec_loss(
    decision: Tensor,
    seg_logits: Tensor,
    label: Tensor,
    seg_target: Tensor,
    seg_weight: Tensor,
    segmented: Tensor,
    w_seg: float,
    w_dec: float,
) -> dict[str, Tensor]:
    """Total loss, mean over the batch of ``w_seg * L_seg_i * [segmented_i] + w_dec * L_dec_i``.

    L_seg_i is the mean over pixels of BCE(seg_logits, soft target) * weight; L_dec_i the BCE of the
    decision logit against the image label. Also returns the two components (for logging).
    """
    label = label.to(decision.dtype).reshape(decision.shape)
    l_dec = F.binary_cross_entropy_with_logits(decision, label, reduction="none")  # [B]
    bce = F.binary_cross_entropy_with_logits(seg_logits.float(), seg_target.float(), reduction="none")
    l_seg = (bce * seg_weight.float()).flatten(1).mean(1)  # [B]
    seg_on = segmented.to(l_seg.dtype).reshape(l_seg.shape)
    loss = (w_seg * l_seg * seg_on + w_dec * l_dec.float()).mean()  # L = w_seg * L_seg + w_dec * L_dec
    n_seg = seg_on.sum()
    seg_mean = (l_seg * seg_on).sum() / n_seg.clamp_min(1.0)
    return {"loss": loss, "loss_seg": seg_mean.detach(), "loss_dec": l_dec.detach().float().mean()}
