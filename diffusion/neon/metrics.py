"""Sample-quality metrics from features: FID (Frechet distance), precision/recall (Kynkaanniemi et al. 2019).

Feature extractors are callables ``images [N, C, H, W] float in [0, 1] -> features [N, D]``. Everything works
offline: give a local Inception weights file, a TorchScript file, or any ``module:function`` of your own.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

__all__ = [
    "FeatureExtractor",
    "FeatureSpecError",
    "compute_features",
    "fid_from_features",
    "load_feature_extractor",
    "load_image_folder",
    "precision_recall",
]

FeatureExtractor = Callable[[Tensor], Tensor]


class FeatureSpecError(ValueError):
    """A feature-extractor spec that names no known kind or importable factory (a usage error on the CLI)."""


def _np64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {x.shape}")
    return x


def fid_from_features(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    a, b = _np64(real), _np64(fake)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
    with warnings.catch_warnings():  # few samples vs. feature size give singular covariances: handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if isinstance(covmean, tuple):  # older scipy returned (sqrtm, err)
            covmean = covmean[0]
        if not np.isfinite(covmean).all():
            off = np.eye(s1.shape[0]) * eps  # singular product: regularise as pytorch-fid does
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
            if isinstance(covmean, tuple):
                covmean = covmean[0]
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def _kth_nn_radius(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(out)


def _within_manifold(query: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    hits = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i : i + chunk], support)
        hits.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls in feature space."""
    r = torch.as_tensor(_np64(real), dtype=torch.float32)
    f = torch.as_tensor(_np64(fake), dtype=torch.float32)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    # precision: fraction of generated samples inside the real manifold (union of real k-NN balls)
    precision = _within_manifold(f, r, _kth_nn_radius(r, k)).float().mean().item()
    # recall: fraction of real samples inside the generated manifold
    recall = _within_manifold(r, f, _kth_nn_radius(f, k)).float().mean().item()
    return float(precision), float(recall)


@torch.no_grad()
def compute_features(
    extractor: FeatureExtractor, images: Tensor | Iterable[Tensor], batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features of images [N, C, H, W] in [0, 1] (or an iterable of such batches), as float32 CPU [N, D]."""
    if isinstance(extractor, nn.Module):
        try:
            extractor.eval()
        except NotImplementedError:  # torch.export modules are already in inference form
            pass
        if device is not None:
            extractor.to(device)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    feats = []
    for x in batches:
        if device is not None:
            x = x.to(device)
        y = extractor(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        feats.append(y.reshape(len(x), -1).float().cpu())
    if not feats:
        raise ValueError("no images to compute features of")
    return torch.cat(feats)


class _Resize(nn.Module):
    """Bilinear resize + RGB expansion + normalisation in front of an image model."""

    def __init__(self, net: nn.Module, size: int, mean: tuple, std: tuple, uint8: bool = False):
        super().__init__()
        self.net, self.size, self.uint8 = net, size, uint8
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = nn.functional.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.uint8:
            return self.net((x.clamp(0, 1) * 255).round().to(torch.uint8))
        return self.net((x - self.mean) / self.std)


class PixelFeatures(nn.Module):
    """Raw pixels, average-pooled to ``size`` x ``size`` (a cheap, model-free baseline and test extractor)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float(), self.size).flatten(1)


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} weights file '{path}' not found; nothing is downloaded: put the file there "
        "(see weights/README.md) or pass another --features spec"
    )


def load_feature_extractor(spec: str | FeatureExtractor) -> FeatureExtractor:
    """Build a feature extractor from a spec string (or return a callable unchanged).

    - ``inception:PATH``: torchvision Inception-v3 with a local ImageNet state dict (pool features, 2048-d).
    - ``torch-fidelity:PATH``: torch-fidelity's TF-ported FID Inception with a local weights file
      (needs ``pip install torch-fidelity``); the standard FID feature space.
    - ``export:PATH``: a ``torch.export`` program (.pt2) mapping [N, C, H, W] in [0, 1] to [N, D]
      (export it with a dynamic batch dimension).
    - ``torchscript:PATH``: the same as a TorchScript file.
    - ``module.path:factory``: a Python callable returning an extractor (or being one).
    - ``pixels`` / ``pixels:SIZE``: average-pooled raw pixels (model-free baseline).
    """
    if not isinstance(spec, str):
        if not callable(spec):
            raise TypeError(f"feature extractor must be a spec string or a callable, got {type(spec).__name__}")
        return spec
    kind, _, arg = spec.partition(":")
    if kind == "pixels":
        if arg and not (arg.isdigit() and int(arg) >= 1):
            raise FeatureSpecError(f"bad feature extractor spec '{spec}': pixels:SIZE takes a whole number >= 1")
        return PixelFeatures(int(arg) if arg else 8)
    if kind == "inception":
        from torchvision.models import inception_v3

        from vision.weights_io import read_torch_file

        path = Path(arg)
        if not path.is_file():
            raise _missing(path, "Inception-v3")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        sd = read_torch_file(path, "Inception-v3 weights")  # CheckpointCorruptError (a ValueError) naming it
        net.load_state_dict(sd, strict=False)
        net.aux_logits, net.AuxLogits = False, None
        net.fc = nn.Identity()
        return _Resize(net, 299, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    if kind == "torch-fidelity":
        path = Path(arg)
        if not path.is_file():
            raise _missing(path, "torch-fidelity Inception")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("the 'torch-fidelity:' extractor needs `pip install torch-fidelity`") from e
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        return _Resize(net, 299, (0.0,), (1.0,), uint8=True).eval()
    if kind == "export":
        path = Path(arg)
        if not path.is_file():
            raise _missing(path, "torch.export feature extractor")
        return torch.export.load(str(path)).module()
    if kind == "torchscript":
        path = Path(arg)
        if not path.is_file():
            raise _missing(path, "TorchScript feature extractor")
        return torch.jit.load(str(path), map_location="cpu").eval()
    if arg and all(part.isidentifier() for part in kind.split(".")):
        try:
            obj = getattr(importlib.import_module(kind), arg)
        except (ImportError, AttributeError) as e:
            raise FeatureSpecError(f"cannot import feature extractor '{spec}': {e}") from e
        if isinstance(obj, type) or (not isinstance(obj, nn.Module) and callable(obj) and _takes_no_args(obj)):
            obj = obj()  # a factory
        if not callable(obj):
            raise TypeError(f"feature extractor '{spec}' is not callable")
        return obj
    raise FeatureSpecError(
        f"unknown feature extractor spec '{spec}'; use inception:PATH, torch-fidelity:PATH, export:PATH, torchscript:PATH, "
        "module:factory or pixels[:SIZE]"
    )


def _takes_no_args(fn: Callable) -> bool:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


def load_image_folder(
    folder: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3, limit: int | None = None
) -> Tensor:
    """Images of a folder (recursively, sorted) as float [N, C, H, W] in [0, 1], resized to ``size`` (h, w)."""
    from PIL import Image

    from vision.io import IMAGE_EXTENSIONS, ImageReadError, list_image_files, open_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder '{folder}' does not exist")
    files = list_image_files(folder)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in reference folder '{folder}'")
    mode = "L" if channels == 1 else "RGB"
    out = []
    for p in files:
        try:
            im = open_image(p, mode)  # EXIF orientation applied, like every other reader
        except ImageReadError as e:
            raise ValueError(f"cannot read reference image: {e}") from None
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1))
    return torch.stack(out)
