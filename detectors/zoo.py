"""The detector zoo: torchvision FCOS / RetinaNet on the same backbone + FPN as ATSS (for comparisons), and
``create_detector`` / ``list_detectors`` over the registry (ATSS registers itself in ``detectors/atss/model.py``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

import detectors.atss  # noqa: F401  (registers "atss")
from detectors.registry import DETECTORS
from vision.backbones import Backbone, build_fpn, create_backbone


class BackboneWithFPN(nn.Module):
    """Our backbone (C3-C5) + FPN with P6/P7 from P5, returning an OrderedDict as torchvision detectors expect."""

    def __init__(self, backbone: Backbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = build_fpn(backbone, out_channels, extra="p6p7", p6p7_from="p5")
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.fpn(self.body(x))))


def _torchvision_detector(cls: type, num_classes: int, backbone: str | Backbone, pretrained_backbone: bool | str,
                          fpn_channels: int, min_size: int, max_size: int, freeze_bn: bool | None,
                          **kwargs: Any) -> nn.Module:
    """``cls`` (torchvision FCOS / RetinaNet) on our backbone + FPN, normalised with the backbone's mean / std."""
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, pretrained=pretrained_backbone,
                                                                         out_strides=(8, 16, 32))
    if freeze_bn if freeze_bn is not None else bool(pretrained_backbone):
        bb.freeze_batch_norm()
    model = cls(BackboneWithFPN(bb, fpn_channels), num_classes, min_size=min_size, max_size=max_size,
                image_mean=list(bb.mean), image_std=list(bb.std), **kwargs)
    model.config = {"num_classes": num_classes, "backbone": bb.name, "fpn_channels": fpn_channels,
                    "min_size": min_size, "max_size": max_size}
    return model


@DETECTORS.register("fcos")
def fcos(num_classes: int, backbone: str | Backbone = "efficientnet_lite0.offline", pretrained_backbone: bool | str = False,
         fpn_channels: int = 256, min_size: int = 800, max_size: int = 1333, freeze_bn: bool | None = None,
         **kwargs: Any) -> nn.Module:
    """torchvision FCOS with this toolkit's backbone + FPN (P3-P7)."""
    from torchvision.models.detection import FCOS

    return _torchvision_detector(FCOS, num_classes, backbone, pretrained_backbone, fpn_channels, min_size, max_size,
                                 freeze_bn, **kwargs)


@DETECTORS.register("retinanet")
def retinanet(num_classes: int, backbone: str | Backbone = "efficientnet_lite0.offline",
              pretrained_backbone: bool | str = False, fpn_channels: int = 256, min_size: int = 800,
              max_size: int = 1333, freeze_bn: bool | None = None, **kwargs: Any) -> nn.Module:
    """torchvision RetinaNet (9 anchors per location, focal loss, smooth-L1 / L1 boxes) on the same backbone + FPN."""
    from torchvision.models.detection import RetinaNet

    return _torchvision_detector(RetinaNet, num_classes, backbone, pretrained_backbone, fpn_channels, min_size,
                                 max_size, freeze_bn, **kwargs)


def create_detector(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered detector by name."""
    return DETECTORS.create(name, num_classes=num_classes, **kwargs)


def list_detectors() -> list[str]:
    """Registered detector names."""
    return DETECTORS.names()
