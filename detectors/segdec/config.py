"""SegDecNet's method settings (:class:`SegDecConfig`) and the official dataset presets (:data:`PRESETS`).

A preset is a pair: the :class:`SegDecConfig` of a dataset (input size, channels, loss settings, mask dilation) and
the :class:`~vision.engine.TrainConfig` of its official schedule (epochs, learning rate, batch, plain SGD).
``train_segdec(data, config, train, run)`` fills every setting left None from the preset of the data's layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision.engine.config import ENGINE_DEFAULTS, TrainConfig

_PLAIN_SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, scheduler="constant")


@dataclass
class DefectDataConfig:
    """The data settings every defect method shares (SegDecNet's and PatchCore's configs extend it).

    Attributes:
        dataset_kind: the data's layout ("auto": detected; a :data:`PRESETS` name otherwise).
        img_size: "WIDTHxHEIGHT" or one side; None: the preset's (a folder: the images' own size).
        channels: 1 or 3; None: the preset's (a folder: the images' own).
        val_split: stratified share of the training images held out for validation (0: none).
        val_data: a folder whose training split is the validation set instead.
        cache: decode the images once into a cache file.
        dagm_class, fold: the DAGM class / KSDD fold to use.
        final_eval: evaluate the test split at the end (with pictures, up to ``max_images``).
    """

    dataset_kind: str = "auto"
    img_size: Any = None
    channels: int | None = None
    val_split: float = 0.15
    val_data: str | Path | None = None
    cache: bool = False
    dagm_class: int | None = None
    fold: int = 0
    final_eval: bool = True
    max_images: int = 16


@dataclass
class SegDecConfig(DefectDataConfig):
    """What SegDecNet learns and from what (None: the preset of the data's layout, or the rule named); the data
    settings are :class:`DefectDataConfig`'s.

    Attributes:
        delta: the dynamic loss balancing's final decision-loss weight.
        p, w_pos: distance-transform weights of positive pixels (exponent, weight of a defect's centre).
        dilate: mask dilation (pixels).
        dynamic: dynamic balancing of the segmentation and decision losses.
        grad_adjust: the decision loss does not reach the segmentation net (gradient multiplier 0, or
            ``grad_multiplier``).
        grad_multiplier: scales the decision loss's gradient into the segmentation net (overrides ``grad_adjust``).
        weak_grad_multiplier: the same for samples without a mask in weak / mixed supervision (0 = the official).
        frequency: frequency-of-use negative sampling (else uniform).
        weighted: distance-transform weights of positive pixels (else uniform).
        num_segmented: defective training images that keep their masks (None: all).
        backbone: "auto" (the pretrained registry trunk when some defective images lack masks, else the paper's),
            "paper", or a backbone registry / timm name.
        pretrained: the registry trunk's weights (None: True for a registry trunk), False, or a weights file.
        width: channel multiplier of the paper's trunk.
        stats_head: the decision network's statistics branch (None: on with a registry trunk in weak / mixed
            supervision; see :class:`SegDecNet`).
        augment: surface augmentation (None: on in weak / mixed supervision; a dict: ``SurfaceAugment`` arguments).
        trunk_lr_scale: a registry trunk learns at this share of the learning rate (the new layers at the full
            rate); None: 1.
    """

    delta: float | None = None
    p: float | None = None
    w_pos: float | None = None
    dilate: int | None = None
    dynamic: bool = True
    grad_adjust: bool = True
    grad_multiplier: float | None = None
    weak_grad_multiplier: float = 1.0
    frequency: bool = True
    weighted: bool = True
    num_segmented: int | None = None
    backbone: str | None = "auto"
    pretrained: bool | str | None = None
    width: float = 1.0
    stats_head: bool | None = None
    augment: bool | dict[str, Any] | None = None
    trunk_lr_scale: float | None = None

    def resolved(self, layout: str) -> SegDecConfig:
        """A copy whose preset fields left None take the preset of ``layout``."""
        preset = preset_of(layout)[0]
        return dataclasses.replace(self, **{f: getattr(preset, f) for f in PRESET_FIELDS if getattr(self, f) is None})


# The SegDecConfig fields a preset sets.
PRESET_FIELDS = ("img_size", "channels", "delta", "p", "w_pos", "dilate")

# Official experiment settings (vicoslab/mixed-segdec-net-comind2021, EXPERIMENTS_COMIND.sh / config.py).
# img_size is WIDTHxHEIGHT. Plain SGD (no momentum, no weight decay, constant lr) as the official code.
# Severstal: the official code sums per-sample losses over its batch of 10 at lr 0.1; our loss is the batch
# mean, so the same update needs lr 1.0.
PRESETS: dict[str, tuple[SegDecConfig, TrainConfig]] = {
    "dagm": (SegDecConfig(img_size="512x512", channels=1, delta=1.0, p=1.0, w_pos=10.0, dilate=7),
             TrainConfig(epochs=70, lr=0.05, batch_size=1, **_PLAIN_SGD)),
    "ksdd": (SegDecConfig(img_size="512x1408", channels=1, delta=0.01, p=2.0, w_pos=1.0, dilate=7),
             TrainConfig(epochs=50, lr=1.0, batch_size=1, **_PLAIN_SGD)),
    "ksdd2": (SegDecConfig(img_size="232x640", channels=3, delta=1.0, p=2.0, w_pos=3.0, dilate=15),
              TrainConfig(epochs=50, lr=0.01, batch_size=1, **_PLAIN_SGD)),
    "severstal": (SegDecConfig(img_size="1600x256", channels=1, delta=0.1, p=2.0, w_pos=1.0, dilate=1),
                  TrainConfig(epochs=50, lr=1.0, batch_size=10, **_PLAIN_SGD)),
    # generic folders: DAGM's loss settings, the images' own size and channels, no mask dilation
    "folder": (SegDecConfig(img_size=None, channels=None, delta=1.0, p=1.0, w_pos=10.0, dilate=1),
               TrainConfig(epochs=50, lr=0.05, batch_size=1, **_PLAIN_SGD)),
}


def preset_of(layout: str) -> tuple[SegDecConfig, TrainConfig]:
    """The (method settings, training schedule) preset of a dataset kind."""
    if layout not in PRESETS:
        raise ValueError(f"no preset for dataset kind '{layout}' (known: {', '.join(PRESETS)})")
    return PRESETS[layout]


def preset_train_defaults(layout: str) -> dict[str, Any]:
    """The preset's schedule as :meth:`TrainConfig.resolved` defaults (the task-defaulted fields it sets)."""
    train = preset_of(layout)[1]
    return {k: getattr(train, k) for k in ENGINE_DEFAULTS if train.is_set(k)}
