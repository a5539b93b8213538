"""PatchCore: anomaly detection from good images only (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022).

A frozen ImageNet backbone gives locally aware patch features (Eq. 1-2); those of the good images form a memory
bank (Eq. 3), subsampled by greedy k-center coreset selection (Eq. 4, Algorithm 1). A test patch scores its
distance to the nearest bank feature, the image the largest patch score (Eq. 6). ``PatchCore.forward`` has the
interface of ``SegDecNet.forward`` -- (decision logits [B], segmentation logits [B, 1, H/8, W/8]) -- so
``evaluate_segdec`` and ``run_inference`` (which apply a sigmoid) work unchanged: ``fit`` calibrates the raw
distances into logits on good images held out of the bank.

Where this differs from the paper (and from the reference implementations):

- no reweighting of the image score by the density of the nearest bank feature's neighbourhood (Eq. 7): the
  image score is the plain s* of Eq. 6;
- one neighbourhood size ``k`` (default 1, the paper's): with k > 1 the patch score is the mean distance to the
  k nearest bank features, a kNN variant, not the paper's reweighting;
- feature dimension: the concatenated levels are reduced by adaptive average pooling over channels to
  ``feature_dim`` (384) only when they have more channels than that (EfficientNet-Lite0 levels 2+3 give 152,
  ResNet-18 384: kept whole). The authors' code pools each level and then the stack to 1024 dims; anomalib keeps
  the whole concatenation. The random linear projection of Algorithm 1 is used only inside the coreset search,
  as in the paper; the bank stores the unprojected features;
- the anomaly map stays at the stride-8 grid (the interface's 1/8 resolution), so the paper's Gaussian
  (sigma = 4 px at full resolution) is applied there with sigma / 8 = 0.5 grid cells, not after upsampling;
- logits: the paper outputs raw distances; here ``(score - score_center) / score_scale`` with the centre and
  scale measured on good images held out of the bank (1 in 5), so those are not in the bank.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchCore", "greedy_coreset", "knn_distance"]

# cdist through a matrix product at every size (its default switches at 25 rows, a size test an exported graph with a
# dynamic batch cannot keep): eager and exported scores are computed the same way
CDIST_MODE = "use_mm_for_euclid_dist"
STRIDE = 8  # the anomaly map is at 1/8 of the input resolution, as SegDecNet's segmentation map


def greedy_coreset(features: Tensor, n: int, seed: int = 0, proj_dim: int | None = 128) -> Tensor:
    """Indices [n] of a greedy k-center coreset of ``features`` [N, D], in the order picked (Algorithm 1).

    The first index is ``torch.randint(N, (1,), generator=torch.Generator().manual_seed(seed))``; the same
    generator then draws the Gaussian projection to ``proj_dim`` dims (None, or >= D: no projection), so the
    result is deterministic for a seed (on one device). ``n >= N`` returns ``arange(N)``.
    """
    if features.dim() != 2:
        raise ValueError(f"greedy_coreset expects features [N, D], got shape {tuple(features.shape)}")
    n_all, dim = features.shape
    if n < 0:
        raise ValueError(f"coreset size n must be >= 0, got {n}")
    if n >= n_all:
        return torch.arange(n_all, device=features.device)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    g = torch.Generator().manual_seed(int(seed))
    start = torch.randint(n_all, (1,), generator=g).to(features.device)
    z = features.float()
    if proj_dim is not None and proj_dim < dim:
        # psi: random linear projection R^D -> R^d* (Johnson-Lindenstrauss), only to speed up the distances
        psi = torch.randn(dim, proj_dim, generator=g) / math.sqrt(proj_dim)
        z = z @ psi.to(z.device)
    selected = torch.empty(n, dtype=torch.long, device=features.device)
    selected[0] = start[0]
    # min_{n in M_C} ||psi(m) - psi(n)||^2 for every m (squared: the same argmax, no sqrt)
    min_d = (z - z[start]).pow(2).sum(dim=1)
    min_d[start] = -1.0  # never picked again, even among duplicate features
    for t in range(1, n):
        # m_i <- argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2 ; M_C <- M_C + {m_i}
        i = torch.argmax(min_d)
        selected[t] = i
        min_d = torch.minimum(min_d, (z - z[i]).pow(2).sum(dim=1))
        min_d[i] = -1.0
    return selected


def knn_distance(queries: Tensor, bank: Tensor, k: int = 1, chunk_size: int | None = None) -> Tensor:
    """Mean Euclidean distance [M] of each query [M, D] to its ``k`` nearest rows of ``bank`` [N, D].

    ``torch.cdist`` runs on chunks of ``chunk_size`` queries (default: about 2**24 distances at a time).
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    k = min(int(k), bank.shape[0])
    if chunk_size is None:
        chunk_size = max(1, 2**24 // bank.shape[0])
    bank = bank.to(queries.dtype)
    if torch.compiler.is_exporting():  # an exported graph has a dynamic batch: one cdist, no size-dependent split
        d = torch.cdist(queries, bank, compute_mode=CDIST_MODE)
        return d.min(dim=1).values if k == 1 else d.topk(k, dim=1, largest=False).values.mean(dim=1)
    out = []
    for q in queries.split(chunk_size):
        d = torch.cdist(q, bank, compute_mode=CDIST_MODE)  # ||m_test - m||_2 for every bank feature m
        # s = min_{m in M} ||m_test - m||_2 (k = 1); mean of the k smallest otherwise
        out.append(d.min(dim=1).values if k == 1 else d.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out) if out else queries.new_zeros(0)


def _gaussian_kernel1d(sigma: float) -> Tensor:
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


class PatchCore(nn.Module):
    """PatchCore anomaly scorer; ``forward(x) -> (decision logits [B], segmentation logits [B, 1, H/8, W/8])``.

    Inputs are images in [0, 1] with ``in_channels`` channels and H, W divisible by 8; ``fit`` on good images
    before the first forward. A saved ``state_dict`` loads into a fresh ``PatchCore(**config)``: the
    ``memory_bank`` buffer takes the file's size on load (its feature dimension must match).

    Args:
        in_channels: 1 (grey, repeated to the backbone's 3 channels) or the backbone's channel count (3).
        backbone: a backbone registry or timm name; frozen, in eval mode, run without gradients. Its own input
            normalisation (``mean``, ``std``) is applied to the [0, 1] inputs.
        pretrained: True (the registry's weights), False (random: tests only), or a weights file.
        layers: timm feature indices used (``create_backbone(out_indices=...)``); the default (2, 3) are the
            stride-8 and stride-16 levels of ResNets and EfficientNets (the paper's ``layer2`` + ``layer3``).
        patch_size: p, the side of the neighbourhood averaged into each patch feature (odd; 1 = none).
        coreset_ratio: share of the bank's patch features kept by the coreset, in (0, 1].
        max_bank: at most this many features in the memory bank.
        k: nearest bank features averaged into a patch score (1 = the paper's).
        feature_dim: patch features with more channels are reduced to this many by adaptive average pooling
            over channels; None keeps all.
        sigma: standard deviation of the Gaussian smoothing the anomaly map, in input pixels (the paper's 4).
    """

    memory_bank: Tensor
    score_center: Tensor
    score_scale: Tensor

    def __init__(
        self,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0.offline",
        pretrained: bool | str = True,
        layers: tuple[int, ...] = (2, 3),
        patch_size: int = 3,
        coreset_ratio: float = 0.1,
        max_bank: int = 20000,
        k: int = 1,
        feature_dim: int | None = 384,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        from vision.backbones import create_backbone

        if not layers:
            raise ValueError("layers must name at least one feature level")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd number >= 1, got {patch_size}")
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if max_bank < 1 or k < 1:
            raise ValueError(f"max_bank and k must be >= 1, got max_bank={max_bank}, k={k}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 or None, got {feature_dim}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.backbone_name = backbone
        self.layers = tuple(int(i) for i in layers)
        self.backbone = create_backbone(backbone, pretrained=pretrained, out_indices=self.layers)
        self.backbone.eval().requires_grad_(False)
        mean, std = torch.tensor(self.backbone.mean), torch.tensor(self.backbone.std)
        if in_channels not in (1, mean.numel()):
            raise ValueError(f"backbone '{backbone}' takes {mean.numel()}-channel input; in_channels must be 1 "
                             f"(repeated) or {mean.numel()}, got {in_channels}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.in_channels = int(in_channels)
        self.patch_size = int(patch_size)
        self.coreset_ratio = float(coreset_ratio)
        self.max_bank = int(max_bank)
        self.k = int(k)
        self.sigma = float(sigma)
        self.feature_dim_max = feature_dim
        channels = sum(self.backbone.out_channels)
        self.feature_dim = channels if feature_dim is None else min(channels, int(feature_dim))
        # empty until fit; load_state_dict gives it the file's number of rows (see _load_from_state_dict)
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_dim))
        self.register_buffer("score_center", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able) that rebuild this scorer, weights aside (``pretrained`` not included)."""
        return {
            "in_channels": self.in_channels, "backbone": self.backbone_name, "layers": list(self.layers),
            "patch_size": self.patch_size, "coreset_ratio": self.coreset_ratio, "max_bank": self.max_bank,
            "k": self.k, "feature_dim": self.feature_dim_max, "sigma": self.sigma,
        }

    @property
    def fitted(self) -> bool:
        """Whether the memory bank holds features (``fit`` ran or a fitted state dict was loaded)."""
        return self.memory_bank.shape[0] > 0

    def train(self, mode: bool = True) -> PatchCore:
        """Set the mode of the module; the backbone stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        bank = state_dict.get(prefix + "memory_bank")
        if isinstance(bank, Tensor):
            if bank.dim() != 2 or bank.shape[1] != self.feature_dim:
                error_msgs.append(
                    f"memory_bank: the file's features are {tuple(bank.shape)}, this PatchCore makes "
                    f"{self.feature_dim}-dim features (different backbone, layers or feature_dim?)")
            else:  # resize the buffer to the file's bank, so a fresh PatchCore(**config) loads any fitted one
                self.memory_bank = torch.empty(bank.shape, dtype=self.memory_bank.dtype,
                                               device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"PatchCore expects a batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"PatchCore was built for {self.in_channels} input channel(s), got {x.shape[1]}")
        h, w = x.shape[-2:]
        if h % STRIDE or w % STRIDE or h == 0 or w == 0:
            raise ValueError(f"PatchCore needs H and W divisible by {STRIDE} (the anomaly map is at 1/{STRIDE}); "
                             f"got H={h}, W={w}. Resize or pad the images (e.g. --img-size)")

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Locally aware patch features [B, D, H/8, W/8] of images [B, C, H, W] in [0, 1] (Eq. 1-2)."""
        self._check_input(x)
        if x.shape[1] == 1 and self.mean.shape[1] != 1:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        x = (x.float() - self.mean) / self.std  # the backbone's own normalisation
        grid = (x.shape[-2] // STRIDE, x.shape[-1] // STRIDE)
        maps = []
        for f in self.backbone(x):
            f = f.float()
            # phi_j(N_p(h, w)) = f_agg({phi_j(a, b) | (a, b) in N_p(h, w)}), f_agg: mean over the p x p neighbourhood
            f = F.avg_pool2d(f, self.patch_size, stride=1, padding=self.patch_size // 2, count_include_pad=False)
            if tuple(f.shape[-2:]) != grid:  # deeper levels upsampled to the stride-8 grid, finer ones averaged
                if f.shape[-2] < grid[0] or f.shape[-1] < grid[1]:
                    f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                else:
                    f = F.adaptive_avg_pool2d(f, grid)
            maps.append(f)
        z = torch.cat(maps, dim=1)
        if z.shape[1] > self.feature_dim:  # adaptive average pooling over channels to feature_dim
            b, c, h, w = z.shape
            z = F.adaptive_avg_pool1d(z.permute(0, 2, 3, 1).reshape(-1, 1, c), self.feature_dim)
            z = z.reshape(b, h, w, self.feature_dim).permute(0, 3, 1, 2)
        return z.contiguous()

    def _patch_scores(self, z: Tensor) -> Tensor:
        """Distance [B, h, w] of each patch feature of ``z`` [B, D, h, w] to the memory bank."""
        b, d, h, w = z.shape
        s = knn_distance(z.permute(0, 2, 3, 1).reshape(-1, d), self.memory_bank, self.k)
        return s.view(b, h, w)

    def _smooth(self, amap: Tensor) -> Tensor:
        """Gaussian blur of [B, 1, h, w] with ``sigma`` input pixels = sigma / 8 grid cells (replicate padding)."""
        s = self.sigma / STRIDE
        if s <= 0:
            return amap
        kern = _gaussian_kernel1d(s).to(amap)
        r = kern.numel() // 2
        amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="replicate"), kern.view(1, 1, 1, -1))
        return F.conv2d(F.pad(amap, (0, 0, r, r), mode="replicate"), kern.view(1, 1, -1, 1))

    @torch.no_grad()
    def anomaly_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (uncalibrated) image scores [B] and smoothed anomaly maps [B, 1, H/8, W/8] of images in [0, 1]."""
        if not self.fitted:
            raise ValueError("PatchCore has an empty memory bank: call fit(good_images) or load a fitted state dict "
                             "before scoring")
        patch = self._patch_scores(self.embed(x))
        image = patch.flatten(1).amax(dim=1)  # s* = max_{m_test in P(x_test)} min_{m in M} ||m_test - m||_2 (Eq. 6)
        return image, self._smooth(patch.unsqueeze(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decision logits [B], segmentation logits [B, 1, H/8, W/8]): ``(score - score_center) / score_scale``."""
        image, amap = self.anomaly_scores(x)
        return (image - self.score_center) / self.score_scale, (amap - self.score_center) / self.score_scale

    @torch.no_grad()
    def fit(self, images: Iterable[Any], seed: int = 0, holdout_every: int = 5, progress: bool = False) -> dict[str, Any]:
        """Build the memory bank from good images and calibrate the logits; returns a summary dict.

        ``images`` yields batches [B, C, H, W] (or [C, H, W]) in [0, 1], or dicts with an ``"image"`` batch (a
        DataLoader over a DefectDataset: items whose ``"label"`` is not 0 are skipped). Image i (counted over the
        whole stream) with ``i % holdout_every == holdout_every - 1`` is held out of the bank (the last image when
        that picks none) and scored: ``score_center`` = the largest held-out image score, ``score_scale`` = their
        standard deviation (at least 5 % of the centre), so a typical good image gets a logit <= 0 (about
        1 in n_held + 1 new good images still scores above the largest held-out one, hence a logit > 0).
        """
        if holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
        t0 = time.perf_counter()
        was_training = self.training
        self.eval()
        device = self.memory_bank.device
        it: Any = images
        if progress:
            from vision.progress import track

            it = track(images, desc="patchcore fit", unit="batch")
        feats: list[Tensor] = []  # one [P, D] per image
        skipped = 0
        try:
            for batch in it:
                x = batch["image"] if isinstance(batch, Mapping) else batch
                if not isinstance(x, Tensor):
                    raise ValueError(f"fit expects batches of image tensors [B, C, H, W], got {type(x).__name__}")
                if x.dim() == 3:
                    x = x.unsqueeze(0)
                if isinstance(batch, Mapping) and batch.get("label") is not None:
                    good = torch.as_tensor(batch["label"]).reshape(-1).to(x.device) == 0
                    skipped += int((~good).sum())
                    x = x[good]
                if x.shape[0] == 0:
                    continue
                z = self.embed(x.to(device))
                feats.extend(zi.flatten(1).T.contiguous() for zi in z)  # P(x_i): [h*w, D] per image (Eq. 2)
            n_img = len(feats)
            if n_img == 0:
                raise ValueError("fit got no (good) images: PatchCore needs at least one defect-free image "
                                 "(two or more to calibrate its scores)")
            if n_img == 1:
                warnings.warn("PatchCore.fit got a single image: no image is held out, the scores are calibrated "
                              "on the bank's own image (too low); give it more good images", stacklevel=2)
                held = [0]
            else:
                held = [i for i in range(n_img) if i % holdout_every == holdout_every - 1] or [n_img - 1]
            held_set = set(held) if n_img > 1 else set()
            # M = U_{x_i in X_N} P(x_i) (Eq. 3), over the images not held out
            bank_all = torch.cat([f for i, f in enumerate(feats) if i not in held_set])
            n_keep = min(self.max_bank, max(1, math.ceil(self.coreset_ratio * bank_all.shape[0])))
            # M_C: greedy approximation of argmin_{M_C} max_{m in M} min_{n in M_C} ||m - n||_2 (Eq. 4)
            idx = greedy_coreset(bank_all, n_keep, seed=seed)
            self.memory_bank = bank_all[idx].contiguous()
            scores = torch.stack([knn_distance(feats[i], self.memory_bank, self.k).max() for i in held])
            center = scores.max()
            spread = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
            scale = torch.maximum(spread, 0.05 * center.abs()).clamp_min(1e-6)
            self.score_center = center.to(self.score_center)
            self.score_scale = scale.to(self.score_scale)
        finally:
            self.train(was_training)
        return {
            "images": n_img, "bank_images": n_img - len(held_set), "holdout_images": len(held_set),
            "skipped_defective": skipped, "patches": int(bank_all.shape[0]), "bank_size": int(n_keep),
            "feature_dim": self.feature_dim, "score_center": float(center), "score_scale": float(scale),
            "holdout_scores": [float(s) for s in scores], "seconds": time.perf_counter() - t0,
        }
