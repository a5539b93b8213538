"""Box regression targets as in Faster R-CNN (and ATSS, which keeps them): deltas of centre and log size.

For an anchor (xa, ya, wa, ha) and a box (x, y, w, h), both centre / size form, with weights (wx, wy, ww, wh):

    dx = wx (x - xa) / wa      dy = wy (y - ya) / ha      dw = ww log(w / wa)      dh = wh log(h / ha)

ATSS uses weights (10, 10, 5, 5). Decoding clamps dw, dh at log(1000 / 16) so that exp() cannot overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


class BoxCoder:
    """Encode xyxy boxes as deltas of xyxy anchors and back (the equations above).

    Args:
        weights: (wx, wy, ww, wh) scaling the four deltas.
        clip: upper bound of dw, dh before exp() when decoding.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 clip: float = BBOX_XFORM_CLIP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode_single(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas [N, 4] of ``boxes`` [N, 4] relative to ``anchors`` [N, 4] (both xyxy)."""
        wx, wy, ww, wh = self.weights
        xa, ya, wa, ha = _centre_size(anchors)
        x, y, w, h = _centre_size(boxes)
        return torch.stack((wx * (x - xa) / wa, wy * (y - ya) / ha,  # dx = wx (x - xa) / wa, dy likewise
                            ww * torch.log(w / wa), wh * torch.log(h / ha)), dim=1)  # dw = ww log(w / wa)

    def decode_single(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """xyxy boxes [N, 4] from ``deltas`` [N, 4] and ``anchors`` [N, 4] (the inverse of encode_single)."""
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        xa, ya, wa, ha = _centre_size(anchors)
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.clip)
        dh = (deltas[:, 3] / wh).clamp(max=self.clip)
        x, y = dx * wa + xa, dy * ha + ya  # x = dx wa / wx + xa
        w, h = torch.exp(dw) * wa, torch.exp(dh) * ha  # w = wa exp(dw / ww)
        return torch.stack((x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h), dim=1)
