"""Known weights (weights/manifest.toml): find them locally, download them when allowed, check their sha256.

Search order of ``resolve_weights``: an explicit existing path, ``$NEGVISION_WEIGHTS``, the repo's ``weights/``
folder, the pip package that ships the file, local caches (negvision, torch hub, ~/.cache/clip, the Hugging
Face cache), then a download unless offline. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from vision.io import apply_umask, fsync_dir

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO_WEIGHTS_DIR: Path = Path(__file__).resolve().parents[1] / "weights"
PACKAGED_MANIFEST: Path = Path(__file__).resolve().parent / "_manifest.toml"
README_HINT = "weights/README.md"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz", ".onnx", ".h5")
_SOURCE_KINDS = ("pip", "hf", "timm", "url")
_TRUE = {"1", "true", "yes", "on"}


class WeightsNotFoundError(FileNotFoundError):
    """Weights not found locally and not downloadable; the message says what, where searched, where to put it."""

    def __str__(self) -> str:  # FileNotFoundError would print "[Errno ...]" for multi-arg forms
        return str(self.args[0]) if self.args else ""


class UnknownWeightsError(WeightsNotFoundError):
    """A name that is neither in the manifest nor an existing path (the message lists close matches)."""


class WeightsChecksumError(RuntimeError):
    """A downloaded file's sha256 differs from the manifest."""


# ----------------------------------------------------------------------------------------- manifest


def manifest_path() -> Path:
    """The manifest in use: ``<repo>/weights/manifest.toml`` when present, else the packaged copy."""
    repo = REPO_WEIGHTS_DIR / "manifest.toml"
    return repo if repo.is_file() else PACKAGED_MANIFEST


def _load_manifest(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or manifest_path()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data.get("weights", [])
    seen: set[str] = set()
    for i, e in enumerate(entries):
        for key in ("name", "kind", "source", "filename"):
            if not e.get(key):
                raise ValueError(f"{path}: [[weights]] entry #{i + 1} has no '{key}'")
        if e["name"] in seen:
            raise ValueError(f"{path}: weights name '{e['name']}' appears twice")
        seen.add(e["name"])
        scheme = e["source"].split(":", 1)[0]
        if scheme not in _SOURCE_KINDS or ":" not in e["source"]:
            raise ValueError(f"{path}: weights '{e['name']}': source must start with one of "
                             f"{', '.join(s + ':' for s in _SOURCE_KINDS)} (got {e['source']!r})")
        e.setdefault("layout", "file")
        e.setdefault("sha256", "")
        e.setdefault("license", "")
        e.setdefault("notes", "")
    return entries


def list_weights() -> list[dict[str, Any]]:
    """All manifest entries (copies), in manifest order."""
    return [dict(e) for e in _load_manifest()]


def get_entry(name: str) -> dict[str, Any]:
    """The manifest entry called ``name``; ``UnknownWeightsError`` (with close matches) otherwise."""
    entries = {e["name"]: e for e in _load_manifest()}
    if name in entries:
        return dict(entries[name])
    raise UnknownWeightsError(_unknown_message(name, list(entries)))


def _unknown_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"Unknown weights '{name}' (not a file either).{hint} Known weights: {', '.join(known)}. "
            f"Pass an existing file path, or add an entry to {manifest_path()} (see {README_HINT}).")


# ----------------------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "NEGVISION_OFFLINE"))


def cache_dir() -> Path:
    """Where ``url:`` downloads go: ``$NEGVISION_CACHE`` or ``$XDG_CACHE_HOME/negvision/weights`` (~/.cache)."""
    if os.environ.get("NEGVISION_CACHE"):
        return Path(os.environ["NEGVISION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "negvision" / "weights"


def _env_dirs() -> list[Path]:
    raw = os.environ.get("NEGVISION_WEIGHTS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or "/" in s or s.startswith(("~", ".")) or s.lower().endswith(WEIGHT_SUFFIXES))


def _split_source(source: str) -> tuple[str, str]:
    scheme, _, rest = source.partition(":")
    return scheme, rest


def _hf_repo(entry: dict[str, Any]) -> str | None:
    scheme, rest = _split_source(entry["source"])
    if scheme == "hf":
        return rest
    if scheme == "timm":
        return rest if "/" in rest else f"timm/{rest}"
    return None


def _ok_kind(path: Path, layout: str) -> bool:
    return path.is_dir() if layout == "dir" else path.is_file()


def _where_to_get(entry: dict[str, Any]) -> str:
    scheme, rest = _split_source(entry["source"])
    if scheme == "pip":
        return f"`pip install {rest}` (the file ships inside that package)"
    if scheme == "url":
        return rest
    repo = _hf_repo(entry)
    what = "the repo folder (save_pretrained)" if entry.get("layout") == "dir" else \
        f"file '{entry.get('remote_file') or entry['filename']}'"
    return f"https://huggingface.co/{repo} ({what})"


# ----------------------------------------------------------------------------------------- lookups


def _find_in_pip(entry: dict[str, Any], fname: str, searched: list[str]) -> Path | None:
    dist = _split_source(entry["source"])[1]
    module = entry.get("module") or dist.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        searched.append(f"pip package '{dist}' (not installed)")
        return None
    roots = [Path(p) for p in getattr(mod, "__path__", [])] or [Path(mod.__file__).parent]
    for root in roots:
        for cand in sorted(root.rglob(fname)):
            if _ok_kind(cand, entry["layout"]):
                return cand
    searched.append(f"pip package '{dist}' at {roots[0]} (no {fname})")
    return None


def _find_in_caches(entry: dict[str, Any], fname: str, searched: list[str]) -> Path | None:
    scheme, rest = _split_source(entry["source"])
    dirs = [cache_dir()]
    if scheme == "url":
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
        dirs.append(Path(torch_home) / "hub" / "checkpoints")
        if "openaipublic" in rest:
            dirs.append(Path(os.path.expanduser("~")) / ".cache" / "clip")
    for d in dirs:
        cand = d / fname
        if _ok_kind(cand, entry["layout"]):
            return cand
        searched.append(str(cand))
    repo = _hf_repo(entry)
    if repo:
        try:
            found = _hf_fetch(entry, repo, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            found = None
        if found is not None:
            return found
        searched.append(f"Hugging Face cache (repo {repo})")
    return None


def _hf_fetch(entry: dict[str, Any], repo: str, local_files_only: bool) -> Path:
    if entry["layout"] == "dir":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=entry.get("allow_patterns") or None,
                                      local_files_only=local_files_only))
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, entry.get("remote_file") or entry["filename"],
                                local_files_only=local_files_only))


def _download_url(url: str, target: Path, sha256: str) -> Path:
    """Stream ``url`` to a temp file beside ``target``, check its sha256, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    apply_umask(tmp, directory=False)  # the renamed file gets the mode a plain open() would give
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            total = int(src.headers.get("Content-Length") or 0) or None
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                bar = None
            while block := src.read(1 << 20):
                out.write(block)
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if sha256 and digest != sha256.lower():
            raise WeightsChecksumError(f"downloaded {url} has sha256 {digest}, expected {sha256}; file discarded")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _download(entry: dict[str, Any], fname: str) -> Path:
    scheme, rest = _split_source(entry["source"])
    if scheme == "url":
        return _download_url(rest, cache_dir() / fname, entry.get("sha256", ""))
    repo = _hf_repo(entry)
    if repo is None:
        raise RuntimeError(f"source {entry['source']} cannot be downloaded here")
    path = _hf_fetch(entry, repo, local_files_only=False)
    sha = entry.get("sha256", "")
    if sha and entry["layout"] == "file" and sha256_file(path) != sha.lower():
        raise WeightsChecksumError(f"{path} (from {repo}) has sha256 {sha256_file(path)}, expected {sha}")
    return path


# ----------------------------------------------------------------------------------------- public API


def resolve_weights(name_or_path: str | os.PathLike, *, filename: str | None = None,
                    download: bool | None = None) -> Path:
    """Path of the weights named ``name_or_path`` (a manifest name or a file/folder path).

    Order: existing path > ``$NEGVISION_WEIGHTS/<filename or name>`` > ``<repo>/weights/`` > pip package >
    local caches > download (default on unless ``HF_HUB_OFFLINE``/``NEGVISION_OFFLINE`` is set).
    Raises ``WeightsNotFoundError`` naming the file, the places searched and where to put it.
    """
    s = os.fspath(name_or_path)
    as_path = Path(s).expanduser()
    known = {e["name"]: e for e in _load_manifest()}
    entry = known.get(s)
    if as_path.exists() and (entry is None or _looks_like_path(s)):
        return as_path.resolve()
    if entry is None:
        if filename:
            entry = {"name": s, "kind": "", "source": "", "filename": filename, "layout": "file", "sha256": ""}
        elif _looks_like_path(s):
            raise WeightsNotFoundError(
                f"Weights file '{as_path}' does not exist. Pass an existing path, or a known name "
                f"({', '.join(known)}); see {README_HINT}.")
        else:
            raise UnknownWeightsError(_unknown_message(s, list(known)))
    entry = dict(entry)
    fname = filename or entry["filename"]
    layout = entry.get("layout", "file")
    names = list(dict.fromkeys([fname, entry["name"]]))
    searched: list[str] = []

    env_dirs = _env_dirs()
    if not env_dirs:
        searched.append("$NEGVISION_WEIGHTS (not set)")
    for d in [*env_dirs, REPO_WEIGHTS_DIR]:
        for n in names:
            cand = d / n
            if _ok_kind(cand, layout):
                return cand.resolve()
            searched.append(str(cand))

    scheme = _split_source(entry["source"])[0] if entry["source"] else ""
    if scheme == "pip":
        found = _find_in_pip(entry, fname, searched)
        if found is not None:
            return found.resolve()
    if scheme:
        found = _find_in_caches(entry, fname, searched)
        if found is not None:
            return found

    if download is None:
        download = not _offline()
    download_note = ""
    cause: BaseException | None = None
    if scheme in ("url", "hf", "timm"):
        if download:
            try:
                return _download(entry, fname)
            except WeightsChecksumError:
                raise
            except Exception as e:  # noqa: BLE001 - reported in the one error below
                cause = e
                download_note = f"Download from {entry['source']} failed: {type(e).__name__}: {e}."
        else:
            download_note = "Download is off (HF_HUB_OFFLINE=1 or NEGVISION_OFFLINE=1 is set, or download=False)."

    what = "folder" if layout == "dir" else "file"
    lines = [
        f"Weights '{entry['name']}' not found: expected {what} '{fname}'"
        + (f" ({entry['kind']}, source {entry['source']})." if entry["source"] else "."),
        "Searched:",
        *[f"  - {p}" for p in searched],
    ]
    if download_note:
        lines.append(download_note)
    where = f"Put the {what} in $NEGVISION_WEIGHTS or {REPO_WEIGHTS_DIR}/ (as '{fname}'), or pass its path"
    if entry["source"]:
        where += f"; get it from {_where_to_get(entry)}"
    lines.append(where + f". See {README_HINT}.")
    raise WeightsNotFoundError("\n".join(lines)) from cause


def find_weights(name_or_path: str | os.PathLike, *, filename: str | None = None) -> Path | None:
    """Like ``resolve_weights`` without downloading: the local path, or None when missing."""
    try:
        return resolve_weights(name_or_path, filename=filename, download=False)
    except UnknownWeightsError:
        raise
    except WeightsNotFoundError:
        return None


def verify_weights(name: str) -> tuple[bool, str]:
    """Check the local file of ``name`` against the manifest sha256: (ok, message); missing is not ok."""
    entry = get_entry(name)
    path = find_weights(name)
    if path is None:
        return False, f"missing (expected '{entry['filename']}'; `negvision weights path {name}` says where to put it)"
    if path.is_dir():
        return True, f"{path}: folder; no sha256 recorded"
    if not entry.get("sha256"):
        return True, f"{path}: no sha256 recorded"
    digest = sha256_file(path)
    if digest == entry["sha256"].lower():
        return True, f"{path}: sha256 ok"
    return False, f"{path}: sha256 MISMATCH (got {digest}, manifest {entry['sha256']})"
