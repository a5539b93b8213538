"""CLIP encoders (open_clip) behind a small protocol, and label-text encoding with an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class Encoder(Protocol):
    """Anything with these works as an encoder: images [B,3,H,W] -> [B,D]; texts -> [T,D]; PIL -> tensor."""

    preprocess: Callable[[Any], Tensor]

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...


class OpenClipEncoder:
    """An open_clip model with its eval transform and tokenizer; outputs float32 features (not normalised)."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: torch.device,
                 cache_key: str, text_batch_size: int = 256) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.cache_key = cache_key
        self.text_batch_size = text_batch_size

    @torch.inference_mode()
    def encode_image(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(images.to(self.device, dtype)).float()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.text_batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[-1]
        return int(getattr(self.model, "embed_dim", 0) or self.encode_text(["x"]).shape[-1])


def register_model_config(name: str, cfg: dict[str, Any]) -> str:
    """Make an open_clip model config dict available under ``name`` (written to a temp JSON, then registered)."""
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="negvision_openclip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(folder)
    return name


def _resolve_pretrained(pretrained: str | None) -> str | None:
    """A manifest name (e.g. 'clip_vit_b16_openai') -> its local file; tags, paths and None pass through."""
    if not pretrained or os.path.exists(pretrained):
        return pretrained or None
    try:
        from vision.weights import list_weights, resolve_weights
    except ImportError:  # pragma: no cover
        return pretrained
    names = {e["name"] for e in list_weights() if e.get("kind") == "clip"}
    if pretrained in names:
        return str(resolve_weights(pretrained))
    if any(pretrained.endswith(s) for s in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        raise FileNotFoundError(f"CLIP weights file '{pretrained}' not found; put it there or see weights/README.md")
    return pretrained


def load_encoder(name: str, pretrained: str | None = None, device: str | torch.device | None = None,
                 precision: str = "fp32", seed: int = 0, **kwargs: Any) -> OpenClipEncoder:
    """open_clip ``create_model_and_transforms(name, pretrained)`` wrapped as an Encoder.

    ``name``: an open_clip model (``ViT-B-16-quickgelu``), ``local-dir:PATH`` or ``hf-hub:ORG/REPO``;
    ``pretrained``: an open_clip tag (``openai``), a local weights file, or a weights name from
    weights/manifest.toml. Without weights the model is randomly initialised from ``seed`` (tests).
    """
    import open_clip

    from vision.device import pick_device

    dev = device if isinstance(device, torch.device) else pick_device(device)
    pretrained = _resolve_pretrained(pretrained)
    _check_local_files(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision=precision, device=dev, **kwargs)
        except (FileNotFoundError, RuntimeError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable local file: say which file, in one line
            local = pretrained if pretrained and os.path.isfile(pretrained) else None
            if local is None and not name.startswith("local-dir:"):
                raise
            from vision.io import error_line

            what = local or name.split(":", 1)[1]
            raise ValueError(f"{what}: cannot load these weights ({error_line(e)})") from None
    tokenizer = open_clip.get_tokenizer(name)
    key_src = name if not (pretrained and os.path.exists(pretrained)) else f"{name}|{_file_id(pretrained)}"
    if name.startswith("local-dir:"):
        key_src = f"{name}|{_dir_id(name.split(':', 1)[1])}"
    cache_key = f"{key_src}|{pretrained}|{precision}|seed={seed if not pretrained else '-'}"
    return OpenClipEncoder(model, preprocess, tokenizer, dev, cache_key)


def _check_local_files(name: str, pretrained: str | None) -> None:
    """A local model folder or weights file that is missing, cut short or not JSON fails here with its path,
    not inside open_clip (FileNotFoundError / CheckpointCorruptError, a ValueError)."""
    from vision.io import read_json
    from vision.weights_io import check_weights_file

    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (local-dir: needs a folder holding "
                                    "open_clip_config.json and the weights)")
        cfg = folder / "open_clip_config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg}: not found (a local-dir: model folder holds open_clip_config.json "
                                    "and open_clip_model.safetensors)")
        read_json(cfg)  # ValueError "{cfg}: not valid JSON (...)"
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                check_weights_file(f)
    if pretrained and os.path.isfile(pretrained):
        check_weights_file(pretrained)


def _file_id(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def _dir_id(path: str) -> str:
    return ";".join(_file_id(str(p)) for p in sorted(Path(path).iterdir()) if p.is_file())


def default_cache_dir() -> Path:
    """``$NEGVISION_CACHE/text_features`` or ``~/.cache/negvision/text_features``."""
    root = os.environ.get("NEGVISION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "negvision")
    return Path(root) / "text_features"


def text_cache_key(encoder: Any, labels: Sequence[str], templates: Sequence[str]) -> str | None:
    """sha256 of (model identity, templates, labels); None for encoders without a ``cache_key``."""
    ident = getattr(encoder, "cache_key", None)
    if ident is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps([ident, list(templates), list(labels)], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def encode_labels(encoder: Any, labels: Sequence[str], templates: Sequence[str] = ("{}",),
                  cache_dir: str | Path | None = None, progress: bool = False, chunk: int = 2048) -> Tensor:
    """L2-normalised label features [L, D]: mean over templates of the normalised prompt features, renormalised.

    Cached on disk (safetensors) under a hash of model, templates and labels; ``cache_dir=False`` disables it.
    """
    key = text_cache_key(encoder, labels, templates) if cache_dir is not False else None
    path = None
    if key is not None:
        path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
        if path.is_file():
            from vision.weights_io import read_safetensors

            try:
                return read_safetensors(path)["features"]
            except Exception:  # corrupt cache file: recompute
                pass
    feats = []
    steps = range(0, len(labels), chunk)
    if progress and len(labels) > chunk:
        from tqdm import tqdm

        steps = tqdm(steps, desc="encoding labels", unit="chunk")
    for i in steps:
        part = labels[i : i + chunk]
        acc = None
        for t in templates:
            f = F.normalize(encoder.encode_text([t.format(w) for w in part]).float(), dim=-1)
            acc = f if acc is None else acc + f
        feats.append(F.normalize(acc, dim=-1).cpu())
    out = torch.cat(feats) if feats else torch.zeros(0, 0)
    if path is not None and out.numel():
        from safetensors.torch import save

        from vision.io import write_bytes_atomic

        write_bytes_atomic(path, save({"features": out.contiguous()}))
    return out


def encode_pil(encoder: Any, images: Sequence[Any]) -> Tensor:
    """Encode PIL images with the encoder's own preprocess: [B, D] float32 on CPU."""
    batch = torch.stack([encoder.preprocess(im.convert("RGB")) for im in images])
    return encoder.encode_image(batch).float().cpu()


TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A tiny random CLIP for tests and CPU benchmarks (SimpleTokenizer, offline)."""
