"""ATSS head: two 4 x (conv3x3-GN(32)-ReLU) towers, cls / box / centerness outputs, a learnable scale per level."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes one value per group (one image, one channel per group, a 1 x 1 map: the P7
    level of an image of at most 128 px with --fpn-channels 32), where PyTorch raises "Expected more than 1 value per
    channel". Normalising a single value gives 0, so the output is the bias: the exact limit of the formula. Same
    parameters and state dict as nn.GroupNorm; exported graphs (ONNX, torch.export) keep the plain op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.dim() >= 2 and x.shape[0] * (x.shape[1] // self.num_groups)
                * x[0, 0].numel() == 1):
            out = x * 0.0
            return out + self.bias.view(1, -1, *([1] * (x.dim() - 2))) if self.affine else out
        return super().forward(x)


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ATSSHead(nn.Module):
    """Shared head over FPN levels; ``forward(feats) -> (cls [N,A*C,H,W], box [N,A*4,H,W], ctr [N,A,H,W]) per level``."""

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int = 1, num_convs: int = 4,
                 num_levels: int = 5, prior_prob: float = 0.01, norm_groups: int = 32) -> None:
        super().__init__()
        if in_channels % norm_groups:
            raise ValueError(f"head channels ({in_channels}) must be divisible by GroupNorm groups ({norm_groups})")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_tower = _tower(in_channels, num_convs, norm_groups)
        self.bbox_tower = _tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)  # on the box tower, as in the paper
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        # prior probability pi = 0.01 for the foreground at the start: b = -log((1 - pi) / pi)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls, box, ctr = [], [], []
        for level, f in enumerate(feats):
            c = self.cls_tower(f)
            b = self.bbox_tower(f)
            cls.append(self.cls_logits(c))
            box.append(self.scales[level](self.bbox_pred(b)))
            ctr.append(self.centerness(b))
        return cls, box, ctr
