"""SegDecNet: segmentation network + decision network, trained end-to-end (Božič, Tabernik, Skočaj 2020/2021).

Layer names (``volume``, ``seg_mask``, ``extractor``, ``fc``) follow the official implementation
(vicoslab/mixed-segdec-net-comind2021), so its ``state_dict`` files load into the default network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureNorm", "GradientMultiplier", "SegDecNet", "channel_statistics", "gradient_multiply"]

STRIDE = 8  # the segmentation map is at 1/8 of the input resolution


class GradientMultiplier(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float | Tensor) -> Tensor:  # type: ignore[override]
        ctx.factor = factor if isinstance(factor, Tensor) else float(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def gradient_multiply(x: Tensor, factor: float | Tensor) -> Tensor:
    """``x`` unchanged, but the gradient flowing back through it is scaled by ``factor`` (0 stops it); a tensor
    ``factor`` of shape [B] scales each sample's gradient by its own value."""
    if isinstance(factor, Tensor):
        factor = factor.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return GradientMultiplier.apply(x, factor)


class FeatureNorm(nn.Module):
    """Per-sample, per-channel normalisation over (H, W) with a learnable scale and bias (official "FeatureNorm").

    As in the official code the centred features are divided by ``sqrt(std + eps)`` (std: unbiased, over H, W);
    kept as is so that the official weights behave identically. A 1x1 map uses the biased std (no NaN).
    """

    def __init__(self, num_features: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # statistics in fp32 under autocast
        n = xf.shape[-1] * xf.shape[-2]
        std, mean = torch.std_mean(xf, dim=(2, 3), keepdim=True, correction=1 if n > 1 else 0)
        # y = scale * (x - mean) / sqrt(std + eps) + bias, as one multiply-add over the map
        a = self.scale / (std + self.eps).sqrt()
        y = torch.addcmul(self.bias - mean * a, xf, a)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class XavierConv2d(nn.Conv2d):
    """Conv without bias, Xavier-normal initialised (as the official ``Conv2d_init``)."""

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def _conv_block(cin: int, cout: int, k: int) -> nn.Sequential:
    """conv k x k ('same' padding) -> FeatureNorm -> ReLU."""
    return nn.Sequential(XavierConv2d(cin, cout, k, padding=k // 2, bias=False), FeatureNorm(cout), nn.ReLU())


class _Pool2(nn.MaxPool2d):
    """2x2 max pooling as in the paper; a side of length 1 is kept (ceil mode) instead of vanishing."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2)

    def forward(self, x: Tensor) -> Tensor:
        ceil = min(x.shape[-2:]) < 2
        return F.max_pool2d(x, 2, 2, ceil_mode=ceil)


class _BackboneVolume(nn.Module):
    """A registry backbone's stride-8 map as the segmentation volume; normalises [0, 1] inputs itself.

    ``stats_strides``: the backbone also returns its maps at these strides (<= 8) for the statistics branch
    (:meth:`features` gives them all; ``forward`` only the volume)."""

    def __init__(self, name: str, in_channels: int, pretrained: bool | str,
                 stats_strides: tuple[int, ...] = ()) -> None:
        super().__init__()
        from vision.backbones import create_backbone

        strides = sorted(set(stats_strides) | {STRIDE})
        self.backbone = create_backbone(name, pretrained=pretrained, out_strides=strides)
        self.name = name
        self.strides = strides
        self.volume_index = strides.index(STRIDE)
        self.out_channels = int(self.backbone.out_channels[self.volume_index])
        self.stats_channels = [int(c) for s, c in zip(strides, self.backbone.out_channels, strict=True) if s in stats_strides]
        mean, std = torch.tensor(self.backbone.mean), torch.tensor(self.backbone.std)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.in_channels = in_channels
        n_mean = mean.numel()
        if in_channels not in (1, n_mean):
            raise ValueError(
                f"backbone '{name}' takes {n_mean}-channel input; in_channels must be 1 (repeated) or {n_mean}, "
                f"got {in_channels}"
            )

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's maps at ``self.strides`` (ascending)."""
        if x.shape[1] == 1 and self.mean.shape[1] != 1:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return list(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[self.volume_index]


STATS_STRIDES = (2, 4, 8)  # the statistics branch pools a registry trunk's maps at these strides
STATS_HIDDEN = 32
STATS_EPS = 1e-3


_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
N_PIXEL_MAPS = 3


def pixel_maps(x: Tensor) -> list[Tensor]:
    """The input's own texture maps for the statistics branch: the grey image, its Sobel gradient magnitude and
    its Laplacian (3x3, valid convolution), each [B, 1, h, w]; fixed filters, no parameters."""
    g = x.float().mean(dim=1, keepdim=True)
    kx = torch.tensor(_SOBEL_X, dtype=g.dtype, device=g.device).view(1, 1, 3, 3)
    lap = torch.tensor(_LAPLACE, dtype=g.dtype, device=g.device).view(1, 1, 3, 3)
    gx, gy = F.conv2d(g, kx), F.conv2d(g, kx.transpose(2, 3))
    return [g, torch.sqrt(gx * gx + gy * gy + 1e-12), F.conv2d(g, lap)]


def channel_statistics(maps: list[Tensor]) -> Tensor:
    """[B, sum 2 C]: each map's per-channel mean and log standard deviation over (H, W), in fp32.

    The global (first- and second-order) statistics of the features: what a texture is, and what a slight shift of
    its orientation, scale, contrast or grain changes; the decision network's per-sample FeatureNorm removes them.
    """
    out = []
    for f in maps:
        std, mean = torch.std_mean(f.float(), dim=(2, 3), correction=0)
        out += [mean, torch.log(std + STATS_EPS)]
    return torch.cat(out, dim=1)


class SegDecNet(nn.Module):
    """Two-stage surface-defect network; ``forward(x) -> (decision_logits [B], seg_logits [B, 1, H/8, W/8])``.

    Inputs are images in [0, 1] with ``in_channels`` channels and H, W divisible by 8.

    Args:
        in_channels: 1 (grey, the paper's) or 3 input channels.
        grad_multiplier: scales the decision loss's gradient into the segmentation network (0 = the paper's
            gradient-flow adjustment, 1 = plain end-to-end).
        backbone: None for the paper's trunk (conv5x5 blocks, 1024 channels at stride 8), or a backbone registry /
            timm name used at stride 8 instead.
        pretrained: with ``backbone``: True (the registry's weights), False, or a weights file.
        width: channel multiplier of the paper's trunk (1 = the paper; < 1 is a lighter variant for CPU runs).
        stats_head: add the statistics branch to the decision network (not in the paper): per-channel mean and log
            std of the trunk's maps (a registry trunk: at strides :data:`STATS_STRIDES`; the paper's trunk: its
            volume) and of the input's grey level, gradient magnitude and Laplacian (:func:`pixel_maps`), through
            Linear + ReLU (:data:`STATS_HIDDEN` units), beside the paper's 66 pooled features.
            The paper's decision network normalises every feature map per sample (FeatureNorm) and so cannot see
            a change of the whole image's texture statistics; this branch can.
    """

    def __init__(
        self,
        in_channels: int = 1,
        grad_multiplier: float = 0.0,
        backbone: str | None = None,
        pretrained: bool | str = False,
        width: float = 1.0,
        stats_head: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.grad_multiplier = float(grad_multiplier)
        self.backbone_name = backbone
        if not 0 < width <= 4:
            raise ValueError(f"width must be in (0, 4], got {width}")
        self.width = float(width)
        if backbone is None:
            # paper: conv5x5 32, pool, 3 x conv5x5 64, pool, 4 x conv5x5 64, pool, conv15x15 1024
            # (width != 1 scales these channel counts: a lighter variant for CPU experiments, not the paper's)
            c32, c64, c1024 = (max(1, round(c * width)) for c in (32, 64, 1024))
            self.volume = nn.Sequential(
                _conv_block(in_channels, c32, 5),
                nn.MaxPool2d(2),
                _conv_block(c32, c64, 5),
                _conv_block(c64, c64, 5),
                _conv_block(c64, c64, 5),
                nn.MaxPool2d(2),
                _conv_block(c64, c64, 5),
                _conv_block(c64, c64, 5),
                _conv_block(c64, c64, 5),
                _conv_block(c64, c64, 5),
                nn.MaxPool2d(2),
                _conv_block(c64, c1024, 15),
            )
            volume_channels = c1024
        else:
            self.volume = _BackboneVolume(backbone, in_channels, pretrained,
                                          STATS_STRIDES if stats_head else ())
            volume_channels = self.volume.out_channels
        self.volume_channels = volume_channels
        # segmentation head: 1x1 conv -> 1 channel (logits at 1/8 resolution), feature-normalised as the official
        self.seg_mask = nn.Sequential(XavierConv2d(volume_channels, 1, 1, bias=False), FeatureNorm(1))
        # decision network on [volume, seg map]: pool, conv5x5 8, pool, conv5x5 16, pool, conv5x5 32
        self.extractor = nn.Sequential(
            _Pool2(),
            _conv_block(volume_channels + 1, 8, 5),
            _Pool2(),
            _conv_block(8, 16, 5),
            _Pool2(),
            _conv_block(16, 32, 5),
        )
        # global max + avg of the 32 features and of the segmentation map -> 66 -> 1
        self.stats_head = bool(stats_head)
        if self.stats_head:
            n_stats = 2 * (sum(self.volume.stats_channels) if backbone is not None else volume_channels)
            n_stats += 2 * N_PIXEL_MAPS
            self.stats = nn.Sequential(nn.Linear(n_stats, STATS_HIDDEN), nn.ReLU())
        self.fc = nn.Linear(66 + (STATS_HIDDEN if self.stats_head else 0), 1)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able) that rebuild this network."""
        return {
            "in_channels": self.in_channels,
            "grad_multiplier": self.grad_multiplier,
            "backbone": self.backbone_name,
            "width": self.width,
            **({"stats_head": True} if self.stats_head else {}),
        }

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"SegDecNet expects a batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SegDecNet was built for {self.in_channels} input channel(s), got {x.shape[1]}")
        h, w = x.shape[-2:]
        if h % STRIDE or w % STRIDE or h == 0 or w == 0:
            raise ValueError(
                f"SegDecNet needs H and W divisible by {STRIDE} (the segmentation map is at 1/{STRIDE}); "
                f"got H={h}, W={w}. Resize or pad the images (e.g. --img-size)"
            )

    def forward(self, x: Tensor, grad_multiplier: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(decision logits [B], segmentation logits [B, 1, H/8, W/8]); ``grad_multiplier`` overrides the
        network's for this call, one value per sample when a tensor [B] (mixed supervision: see train_segdec)."""
        self._check_input(x)
        volume, stat_maps = self._volume(x)
        seg = self.seg_mask(volume)  # [B, 1, H/8, W/8] logits
        # gradient-flow adjustment: the decision loss reaches the segmentation net scaled by grad_multiplier
        m = self.grad_multiplier if grad_multiplier is None else grad_multiplier
        return self._decide(volume, seg, m, stat_maps), seg

    def _volume(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(the stride-8 volume, the maps the statistics branch pools: none without it)."""
        if not self.stats_head:
            return self.volume(x), []
        if isinstance(self.volume, _BackboneVolume):
            maps = self.volume.features(x)
            return maps[self.volume.volume_index], [f for s, f in zip(self.volume.strides, maps, strict=True)
                                                     if s in STATS_STRIDES] + pixel_maps(x)
        volume = self.volume(x)
        return volume, [volume, *pixel_maps(x)]

    def _decide(self, volume: Tensor, seg: Tensor, m: Tensor | float, stat_maps: list[Tensor] | None = None) -> Tensor:
        """The decision network on the volume, the segmentation logits (and the statistics branch's maps): [B]."""
        cat = gradient_multiply(torch.cat([volume, seg], dim=1), m)
        feats = self.extractor(cat)
        f_max = torch.amax(feats, dim=(2, 3))
        f_avg = torch.mean(feats, dim=(2, 3))
        s_max = gradient_multiply(torch.amax(seg, dim=(2, 3)), m)
        s_avg = gradient_multiply(torch.mean(seg, dim=(2, 3)), m)
        parts = [f_max, f_avg, s_max, s_avg]
        if self.stats_head:
            stats = channel_statistics([gradient_multiply(f, m) for f in (stat_maps or [volume])])
            parts.append(self.stats(stats.to(f_max.dtype)))
        return self.fc(torch.cat(parts, dim=1)).squeeze(1)

    def decision_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decision logits [B], class-activation map [B, 1, H/8, W/8] in [0, 1]): Grad-CAM of the decision on the
        volume (Selvaraju et al. 2017: ReLU(sum_c mean_hw(d logit / d A_c) * A_c)), each map scaled by its max.
        The localisation map of a network whose segmentation head no mask trained."""
        self._check_input(x)
        with torch.inference_mode(False), torch.enable_grad():
            volume, stat_maps = self._volume(x)
            leaf = volume.detach().clone().requires_grad_(True)
            stat_maps = [leaf if f is volume else f.detach() for f in stat_maps]
            volume = leaf
            seg = self.seg_mask(volume)
            decision = self._decide(volume, seg, 1.0, stat_maps)
            (grad,) = torch.autograd.grad(decision.sum(), volume)
            weights = grad.mean(dim=(2, 3), keepdim=True)  # alpha_c = mean_hw d y / d A_c
            cam = torch.relu((weights * volume).sum(dim=1, keepdim=True))  # ReLU(sum_c alpha_c A_c)
            cam = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
        return decision.detach(), cam.detach()

    @torch.no_grad()
    def predict(self, x: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Defect probability [B] and segmentation probability [B, 1, h, w] upsampled to ``size`` (default: input)."""
        dec, seg = self(x)
        seg = torch.sigmoid(seg.float())
        seg = F.interpolate(seg, size=size or tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return torch.sigmoid(dec.float()), seg
