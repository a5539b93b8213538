"""Atomic checkpoint directories (safetensors weights + training state), damage checks and strict weight loading.

``meta.json`` (written last) lists the size and sha256 of every file of the directory; :func:`verify_checkpoint`
checks them (or, for directories written before that, the structure of the files), and every loader turns a
damaged file into a one-line :class:`CheckpointCorruptError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from vision.io import (  # noqa: F401  (write_json_atomic re-exported)
    apply_umask,
    error_line,
    fsync_dir,
    json_default,
    make_temp_dir,
    write_json_atomic,
)
from vision.weights_io import (
    CheckpointCorruptError,
    check_safetensors_structure,
    check_torch_zip,
    read_torch_file,
    read_weights_file,
)

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"


class WeightsMismatchError(RuntimeError):
    """The weights file does not match the model (missing / unexpected keys or wrong shapes)."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was expected."""


# ----------------------------------------------------------------------------------------------- fs helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_HASH_CHUNK = 1 << 20


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (as stored in meta.json's ``"files"``)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _check_record(path: Path, record: Any) -> None:
    """Raise :class:`CheckpointCorruptError` unless ``path`` has the size and sha256 of ``record``."""
    if not isinstance(record, Mapping) or not isinstance(record.get("size"), int):
        raise CheckpointCorruptError(path.parent / META_FILE, f'bad "files" entry for {path.name}')
    if not path.is_file():
        raise CheckpointCorruptError(path, "missing, meta.json lists it")
    size = path.stat().st_size
    if size != record["size"]:
        raise CheckpointCorruptError(path, f"size {size} bytes, meta.json says {record['size']}")
    want = record.get("sha256")
    if want is not None and file_record(path)["sha256"] != str(want).lower():
        raise CheckpointCorruptError(path, "sha256 differs from meta.json")


def _read_meta(directory: Path) -> dict[str, Any]:
    """Parse ``directory/meta.json``; damage raises :class:`CheckpointCorruptError`."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointCorruptError(meta_path, "missing: the checkpoint was not completely written")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(meta_path, f"not valid JSON: {error_line(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(meta_path, "not a JSON object")
    files = meta.get("files")
    if files is not None and not isinstance(files, dict):
        raise CheckpointCorruptError(meta_path, '"files" is not a JSON object')
    return meta


def _record_beside(path: Path) -> Any | None:
    """The meta.json ``"files"`` entry for ``path`` in its directory, or None if there is none to check."""
    meta_path = path.parent / META_FILE
    if not meta_path.is_file():
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # an unrelated or broken meta.json beside a plain weights file: nothing to compare with
    files = meta.get("files") if isinstance(meta, dict) else None
    return files.get(path.name) if isinstance(files, dict) else None


# ----------------------------------------------------------------------------------------------- weights


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors that share no memory (safetensors requirement)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        else:
            key = t.untyped_storage().data_ptr()
            if key in seen or not t.is_contiguous():
                t = t.contiguous().clone()
            else:
                seen.add(key)
        out[name] = t
    return out


def save_model_weights(
    model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save ``model``'s state dict to a safetensors file (shared tensors are cloned)."""
    save_file(state_dict_for_saving(model), str(path), metadata=metadata or {"format": "pt"})


def _read_weights(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    if path.is_dir():
        cand = path / MODEL_FILE
        if not cand.exists():
            raise CheckpointNotFoundError(f"no {MODEL_FILE} in checkpoint directory '{path}'")
        path = cand
    if not path.exists():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if verify:
        record = _record_beside(path)
        if record is not None:
            _check_record(path, record)
    obj = read_weights_file(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"'{path}' does not hold a state dict of tensors")
    return dict(obj)


def read_weights(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (.safetensors, or a torch file holding a state dict) or a checkpoint folder,
    checked like :func:`load_model_weights` (structure, and the sha256 record beside it when there is one):
    :class:`CheckpointCorruptError` naming a damaged file, ``FileNotFoundError`` for a missing one."""
    return _read_weights(Path(path), verify=verify)


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_model_weights(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, *, verify: bool = True
) -> tuple[list[str], list[str]]:
    """Load weights from a .safetensors / .pt / .pth file (or checkpoint dir) into ``model``.

    With ``strict`` a mismatch raises :class:`WeightsMismatchError` listing missing/unexpected keys and
    shape conflicts. A damaged file raises :class:`CheckpointCorruptError`; with ``verify`` (default) a file
    listed in a ``meta.json`` beside it is first checked against the size and sha256 recorded there.
    Returns ``(missing_keys, unexpected_keys)``.
    """
    path = Path(path)
    sd = _read_weights(path, verify=verify)
    own = model.state_dict()
    # checkpoints saved from a DDP / compiled wrapper carry a prefix
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in own):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    if missing:  # keys tied to another tensor (e.g. shared embeddings saved once) are not really missing
        ptr_to_keys: dict[tuple[int, int, tuple], list[str]] = {}
        for k, v in own.items():
            ptr_to_keys.setdefault((v.data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
        alias_ok = set()
        for keys in ptr_to_keys.values():
            present = [k for k in keys if k in sd]
            if present:
                for k in keys:
                    if k not in sd:
                        sd[k] = sd[present[0]]
                        alias_ok.add(k)
        missing = [k for k in missing if k not in alias_ok]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if bad_shape or (strict and (missing or unexpected)):
        lines = [f"weights in '{path}' do not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {_fmt_keys(bad_shape)}")
        raise WeightsMismatchError("\n".join(lines))
    model.load_state_dict(sd, strict=False)
    return missing, unexpected


# ----------------------------------------------------------------------------------------------- rng


def get_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU + CUDA), numpy and python ``random`` as tensors / plain containers."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ----------------------------------------------------------------------------------------------- directories


def save_checkpoint_atomic(
    directory: str | os.PathLike,
    model: nn.Module | None,
    state: Mapping[str, Any] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    json_files: Mapping[str, Any] | None = None,
    previous_to: str | os.PathLike | None = None,
) -> Path:
    """Write a checkpoint directory atomically: ``model.safetensors``, ``training_state.pt``, ``meta.json``.

    Everything goes into ``<dir>.tmp-XXXX`` first (fsynced); then the old directory is moved aside
    (to ``previous_to`` if given, else deleted) and the new one renamed into place. ``meta.json`` gets a
    ``"files"`` entry ``{name: {"size", "sha256"}}`` for every other file written. Modes follow the umask.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=f"{directory.name}.tmp-")
    files: dict[str, dict[str, Any]] = {}
    try:
        if model is not None:
            save_model_weights(model, tmp / MODEL_FILE)
            apply_umask(tmp / MODEL_FILE, directory=False)
            _fsync_file(tmp / MODEL_FILE)
            files[MODEL_FILE] = file_record(tmp / MODEL_FILE)
        if state is not None:
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(dict(state), f)
                f.flush()
                os.fsync(f.fileno())
            apply_umask(tmp / STATE_FILE, directory=False)
            files[STATE_FILE] = file_record(tmp / STATE_FILE)
        for name, obj in (json_files or {}).items():
            with open(tmp / name, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
                f.flush()
                os.fsync(f.fileno())
            apply_umask(tmp / name, directory=False)
            files[name] = file_record(tmp / name)
        # meta.json is written last: its presence marks a complete directory; it lists what the others hold
        with open(tmp / META_FILE, "w") as f:
            json.dump(
                {**dict(meta or {}), "files": files}, f, indent=2, sort_keys=True, default=json_default
            )
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp / META_FILE, directory=False)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    trash: Path | None = None
    if directory.exists():
        trash = (
            Path(previous_to)
            if previous_to is not None
            else parent / f"{directory.name}.trash-{tmp.name[-8:]}"
        )
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(directory, trash)
    os.replace(tmp, directory)
    fsync_dir(parent)
    if trash is not None and previous_to is None:
        shutil.rmtree(trash, ignore_errors=True)
    return directory


def resolve_checkpoint(directory: str | os.PathLike) -> Path:
    """Return ``directory`` if it is a complete checkpoint, recovering from an interrupted rename if needed."""
    directory = Path(directory)
    if (directory / META_FILE).exists():
        return directory
    parent = directory.parent
    if not directory.exists() and parent.is_dir():
        # crash between "move old aside" and "move new in": prefer the complete new one, else the old one
        for pattern in (f"{directory.name}.tmp-*", f"{directory.name}.trash-*"):
            cands = sorted(
                (p for p in parent.glob(pattern) if (p / META_FILE).exists()),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
            if cands:
                os.replace(cands[0], directory)
                return directory
    raise CheckpointNotFoundError(
        f"no checkpoint found at '{directory}' (expected {MODEL_FILE}, {STATE_FILE} and {META_FILE} there); "
        "start without --resume or pass the path of an existing checkpoint directory"
    )


def load_training_state(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Load ``training_state.pt`` from a checkpoint directory (``weights_only=True``).

    A damaged file raises :class:`CheckpointCorruptError`; with ``verify`` it is first checked against the
    size and sha256 that meta.json records (when it does).
    """
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint '{directory}' has no {STATE_FILE}; it cannot be resumed from"
        )
    if verify:
        record = _record_beside(path)
        if record is not None:
            _check_record(path, record)
    state = read_torch_file(path, "training state")
    if not isinstance(state, dict):
        raise CheckpointCorruptError(path, f"training state is a {type(state).__name__}, not a dict")
    return state


def verify_checkpoint(directory: str | os.PathLike) -> Path:
    """Check a checkpoint directory for damage; return it, or raise :class:`CheckpointCorruptError`.

    meta.json must parse; every file its ``"files"`` entry lists must exist with that size and sha256. A
    directory from before ``"files"`` existed gets structural checks instead: each ``*.safetensors`` (header
    length, JSON header, data size) and ``training_state.pt`` (a zip archive whose members pass their CRC).
    The error names the first bad file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at '{directory}'")
    meta = _read_meta(directory)
    files = meta.get("files")
    if files is not None:
        for name in sorted(files, key=lambda n: (n != MODEL_FILE, n != STATE_FILE, n)):
            if Path(name).name != name:
                raise CheckpointCorruptError(directory / META_FILE, f'bad file name in "files": {name!r}')
            _check_record(directory / name, files[name])
        return directory
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors_structure(path)
    if (directory / STATE_FILE).exists():
        check_torch_zip(directory / STATE_FILE)
    return directory
