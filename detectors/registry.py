"""The detector registry. Each detector registers itself next to its code (``detectors/atss/model.py``, the
torchvision baselines in ``detectors/zoo.py``); ``detectors.zoo.create_detector`` builds one by name."""

from __future__ import annotations

from torch import nn

from vision.registry import Registry

DETECTORS: Registry[nn.Module] = Registry("detector")
