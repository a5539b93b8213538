"""Neon on disk: merge two checkpoints file by file, streaming one tensor at a time.

Reads and writes safetensors one tensor at a time through ``vision.weights_io``'s ``SafetensorsReader`` and
``SafetensorsWriter`` (per-tensor memory maps: peak memory a few times the largest tensor, not the size of the
checkpoint); also torch state-dict files (nested, with EMA groups), diffusers model and pipeline folders. The rule
applied to each tensor is :func:`diffusion.neon.merge.merge_tensor`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vision.io import atomic_writer, fsync_tree, make_temp_dir, replace_dir, write_text_atomic
from vision.weights_io import SafetensorsReader, SafetensorsWriter, read_torch_file

from .merge import CheckpointMismatchError, check_w, merge_tensor

__all__ = [
    "EMA_MODES",
    "MissingComponentError",
    "merge_checkpoints",
    "selftrained_source",
]

EMA_MODES = ("ema", "model", "both")
EMA_PREFIXES = ("ema.", "ema_model.", "model_ema.", "module_ema.")  # flat state dicts with EMA copies
EMA_ENTRIES = ("ema", "ema_model", "model_ema", "ema_state_dict", "state_dict_ema", "ema_params")
MODEL_ENTRIES = ("model", "state_dict", "model_state_dict", "net", "params")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
COMPONENT_CANDIDATES = ("unet", "transformer", "prior", "decoder")


class MissingComponentError(FileNotFoundError):
    """A diffusers folder lacks the component (e.g. ``unet``) to merge."""


# ---------------------------------------------------------------------------------------- tensor sources


class _Source:
    """Keys, shapes and per-key reads over one weights file or the shards of a model folder."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Any] = {}
        self.per_file: dict[Path, Any] = {}  # file -> SafetensorsReader or (original object, flat dict)
        for p in files:
            if p.suffix == ".safetensors":
                r = SafetensorsReader(p)
                self.per_file[p] = r
                for k in r.keys():
                    self.where.setdefault(k, r)
            else:
                obj, d = _read_torch_state(p)
                self.per_file[p] = (obj, d)
                for k in d:
                    self.where.setdefault(k, d)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...] | None:
        src = self.where[key]
        if isinstance(src, SafetensorsReader):
            return src.shape(key)
        v = src[key]
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def get(self, key: str) -> Any:
        src = self.where[key]
        return src.get(key) if isinstance(src, SafetensorsReader) else src[key]


def _read_torch_state(path: Path) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The checkpoint object and a flat {name: value} view of it (memory-mapped where the format allows); a
    damaged file is a CheckpointCorruptError (a ValueError) naming it."""
    obj = read_torch_file(path, memory_map=True)
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"'{path}' does not hold a state dict (got {type(obj).__name__})")
    return obj, _flatten(obj)


_SEP = "::"  # joins the levels of nested torch checkpoints, e.g. "ema::conv.weight"


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + _SEP))
        else:
            out[name] = v
    return out


def _rebuild(obj: Mapping[str, Any], flat: Mapping[str, Any], prefix: str = "") -> dict[Any, Any]:
    """``obj`` with its leaves replaced by ``flat`` (same naming as :func:`_flatten`; key types kept)."""
    out: dict[Any, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        out[k] = _rebuild(v, flat, name + _SEP) if isinstance(v, Mapping) else flat.get(name, v)
    return out


# ---------------------------------------------------------------------------------------- EMA selection


def _ema_kind(key: str) -> str | None:
    """'ema' for EMA weights, 'model' for raw weights of a checkpoint that has both groups, else None."""
    head = key.split(_SEP, 1)[0] if _SEP in key else None
    if head is not None:
        if head in EMA_ENTRIES:
            return "ema"
        if any(s in head.lower() for s in ("optim", "sched", "scaler", "rng", "lr")):
            return None  # optimizer / scheduler state is never merged
        return "model"
    if key.startswith(EMA_PREFIXES):
        return "ema"
    return "model"


def _selector(keys: list[str], ema: str):
    """Which keys to merge: with EMA weights present, merge the group(s) chosen by ``ema``; else everything."""
    if ema not in EMA_MODES:
        raise ValueError(f"ema must be one of {EMA_MODES}, got '{ema}'")
    kinds = {k: _ema_kind(k) for k in keys}
    has_ema = any(v == "ema" for v in kinds.values())
    if not has_ema:
        return lambda k: kinds.get(k) is not None
    wanted = {"ema": {"ema"}, "model": {"model"}, "both": {"ema", "model"}}[ema]
    return lambda k: kinds.get(k) in wanted


# ---------------------------------------------------------------------------------------- locating weights


def _weight_files(folder: Path) -> list[Path]:
    """Weight files of a diffusers model folder (prefers safetensors; shards in order)."""
    st = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if st:
        return st
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)


def _component_folder(folder: Path, component: str | None) -> tuple[Path, str | None]:
    """The model folder to merge inside ``folder`` (a pipeline folder with model_index.json, or a model folder)."""
    if (folder / "model_index.json").exists():
        if component is None:
            index = json.loads((folder / "model_index.json").read_text())
            component = next((c for c in COMPONENT_CANDIDATES if c in index), None)
            if component is None:
                raise MissingComponentError(
                    f"'{folder}' has none of the components {COMPONENT_CANDIDATES}; pass --component"
                )
        sub = folder / component
        if not sub.is_dir() or not _weight_files(sub):
            raise MissingComponentError(
                f"pipeline folder '{folder}' has no component '{component}' with weights "
                f"(expected {sub}/diffusion_pytorch_model.safetensors)"
            )
        return sub, component
    if component is not None and (folder / component).is_dir():
        return folder / component, component
    if _weight_files(folder):
        return folder, None
    if (folder / "model.safetensors").exists():
        return folder, None
    raise MissingComponentError(
        f"'{folder}' holds no weights: expected a diffusers pipeline folder (model_index.json), a model folder "
        f"with diffusion_pytorch_model.safetensors, or a weights file ({', '.join(WEIGHT_SUFFIXES)})"
    )


def selftrained_source(path: Path, component: str | None) -> _Source:
    """The self-trained weights at ``path``: a weights file, a Trainer checkpoint folder, or a diffusers model /
    pipeline folder (its ``component``); keys and per-key reads without loading everything."""
    if path.is_file():
        return _Source([path])
    if not path.exists():
        raise FileNotFoundError(f"self-trained checkpoint '{path}' does not exist")
    if (path / "model.safetensors").exists() and not (path / "model_index.json").exists():
        return _Source([path / "model.safetensors"])  # a negvision Trainer checkpoint directory
    sub, _ = _component_folder(path, component)
    return _Source(_weight_files(sub))


# ---------------------------------------------------------------------------------------- file-level merge


def _merge_stream(
    base: _Source,
    base_files: list[Path],
    selftrained: _Source,
    out_files: list[Path],
    w: float,
    ema: str,
    label: str,
) -> dict[str, int]:
    """Merge ``base`` (file by file) into ``out_files``; returns counts of merged / copied / missing keys."""
    keys = base.keys()
    common = [k for k in keys if k in selftrained]
    if not common:
        raise CheckpointMismatchError(
            f"{label}: the base and self-trained checkpoints have no tensor names in common "
            f"(base e.g. {keys[:3]}, self-trained e.g. {selftrained.keys()[:3]}); are they the same model?"
        )
    for k in common:  # fail before writing anything
        sb, ss = base.shape(k), selftrained.shape(k)
        if sb is not None and ss is not None and sb != ss:
            raise CheckpointMismatchError(
                f"{label}: shape mismatch for '{k}': base {sb} vs self-trained {ss}"
            )
    select = _selector(keys, ema)
    stats = {"merged": 0, "copied": 0, "missing_in_selftrained": len(keys) - len(common)}
    for src_file, dst in zip(base_files, out_files, strict=True):
        if src_file.suffix == ".safetensors":
            reader = base.per_file[src_file]
            layout = [(k, reader.dtype(k), reader.shape(k)) for k in reader.keys()]
            meta = dict(reader.metadata)
            meta["neon_w"] = repr(w)
            with atomic_writer(dst, "r+b") as f:
                writer = SafetensorsWriter(f, layout, meta)
                for k in reader.keys():
                    b = reader.get(k)
                    m = merge_tensor(k, b, selftrained.get(k), w) if (k in selftrained and select(k)) else b
                    stats["merged" if m is not b else "copied"] += 1
                    writer.write(k, m)
                    del b, m
        else:  # torch checkpoint: torch.save needs the whole dict; inputs are memory-mapped
            obj, d = base.per_file[src_file]
            merged: dict[str, Any] = {}
            for k, b in d.items():
                m = merge_tensor(k, b, selftrained.get(k), w) if (k in selftrained and select(k)) else b
                if isinstance(b, torch.Tensor):
                    stats["merged" if m is not b else "copied"] += 1
                merged[k] = m
            _torch_save_atomic(_rebuild(obj, merged), dst)
    if stats["missing_in_selftrained"]:
        warnings.warn(
            f"{label}: {stats['missing_in_selftrained']} tensors of the base are missing from the self-trained "
            "checkpoint and were copied from the base",
            stacklevel=3,
        )
    if stats["merged"] == 0:
        raise CheckpointMismatchError(
            f"{label}: nothing was merged (no floating tensors selected with ema='{ema}')"
        )
    return stats


def _torch_save_atomic(obj: Any, path: Path) -> None:
    with atomic_writer(path, "wb") as f:
        torch.save(obj, f)


def merge_checkpoints(
    base: str | os.PathLike,
    selftrained: str | os.PathLike,
    out: str | os.PathLike,
    w: float,
    *,
    component: str | None = None,
    ema: str = "ema",
) -> dict[str, Any]:
    """Neon-merge two checkpoints on disk, streaming tensor by tensor; returns a summary dict.

    ``base`` may be a .safetensors / torch state-dict file, a diffusers model folder, or a diffusers pipeline
    folder (``component``, default ``unet``/``transformer``, is merged; everything else is copied, and a
    ``<component>_ema`` folder is merged too unless ``ema="model"``). For checkpoints with EMA weights,
    ``ema`` picks the group to merge ("ema" default, "model", "both"); the other group is copied from base.

    Args:
        base: the base checkpoint theta_base (file, model folder, pipeline folder or Trainer checkpoint folder).
        selftrained: the self-trained checkpoint theta_selftrained (the same kinds; a single weights file too).
        out: where to write the merged checkpoint, in the format of ``base`` (written atomically).
        w: extrapolation weight, finite; > 0 moves away from the self-trained model, 0 copies ``base``.
        component: the pipeline component to merge (default: the first of ``unet``, ``transformer``, ``prior``,
            ``decoder`` in ``model_index.json``).
        ema: with EMA weights present, which group to merge: ``"ema"`` (default), ``"model"`` or ``"both"``.

    Returns:
        ``{"out", "w", "format", ...}`` with counts of merged / copied / missing tensors (per merged folder for
        diffusers folders).
    """
    w = check_w(w)
    base, selftrained, out = Path(base), Path(selftrained), Path(out)
    if not base.exists():
        raise FileNotFoundError(f"base checkpoint '{base}' does not exist")
    if not selftrained.exists():
        raise FileNotFoundError(f"self-trained checkpoint '{selftrained}' does not exist")
    if ema not in EMA_MODES:
        raise ValueError(f"ema must be one of {EMA_MODES}, got '{ema}'")
    if out.resolve() in (base.resolve(), selftrained.resolve()):
        raise ValueError(f"--out '{out}' must differ from the inputs")

    if base.is_file():
        if base.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"unknown weights format '{base.suffix}' for '{base}' (use {WEIGHT_SUFFIXES})")
        if out.exists() and out.is_dir():
            out = out / base.name
        stats = _merge_stream(
            _Source([base]), [base], selftrained_source(selftrained, component), [out], w, ema, str(base)
        )
        return {"out": str(out), "w": w, "format": base.suffix.lstrip("."), **stats}

    if (base / "model.safetensors").exists() and not (base / "model_index.json").exists():
        # a Trainer checkpoint directory: merge its weights only
        stats = _merge_stream(
            _Source([base / "model.safetensors"]), [base / "model.safetensors"],
            selftrained_source(selftrained, component), [out / "model.safetensors"], w, ema, str(base),
        )
        return {"out": str(out), "w": w, "format": "checkpoint", **stats}

    comp_dir, comp = _component_folder(base, component)
    merge_dirs = [comp_dir]
    sources = {comp_dir: selftrained_source(selftrained, comp)}
    if comp is not None and ema != "model":
        ema_dir = base / f"{comp}_ema"
        st_ema = selftrained / f"{comp}_ema" if selftrained.is_dir() else None
        if ema_dir.is_dir() and _weight_files(ema_dir):
            if st_ema is None or not st_ema.is_dir():
                raise MissingComponentError(
                    f"base has EMA weights '{ema_dir}' but the self-trained checkpoint has no '{comp}_ema' folder; "
                    "pass --ema model to merge only the raw weights"
                )
            merge_dirs.append(ema_dir)
            sources[ema_dir] = _Source(_weight_files(st_ema))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = make_temp_dir(out.parent, prefix=f".{out.name}.tmp-")
    summary: dict[str, Any] = {"out": str(out), "w": w, "format": "diffusers", "component": comp, "merged_folders": []}
    try:
        root_out = tmp_out
        for item in base.iterdir():
            if item in merge_dirs:
                continue
            if item.is_dir():
                shutil.copytree(item, root_out / item.name)
            elif base != comp_dir or item.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(item, root_out / item.name)
        for d in merge_dirs:
            dst_dir = root_out if d == base else root_out / d.name
            dst_dir.mkdir(parents=True, exist_ok=True)
            files = _weight_files(d)
            if d != base:
                for item in d.iterdir():
                    if item in files or (item.is_file() and item.suffix in WEIGHT_SUFFIXES):
                        continue  # merged, or an unmerged duplicate format (.bin beside .safetensors): dropped
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst_dir / item.name)
            stats = _merge_stream(
                _Source(files), files, sources[d], [dst_dir / f.name for f in files], w, "both", str(d)
            )
            summary["merged_folders"].append({"folder": str(d.relative_to(base)) if d != base else ".", **stats})
        write_text_atomic(
            root_out / "neon.json",
            json.dumps({"w": w, "base": str(base), "selftrained": str(selftrained), "component": comp}, indent=2),
        )
        fsync_tree(tmp_out)  # the copied files too: the folder is complete on disk before it is renamed into place
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    replace_dir(tmp_out, out)
    return summary
