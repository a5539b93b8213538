"""File-level Neon merge: safetensors, torch state dicts, diffusers folders, EMA, errors, memory bound."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion.neon import neon_merge
from diffusion.neon.files import MissingComponentError, merge_checkpoints
from diffusion.neon.merge import CheckpointMismatchError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _sd(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(4, generator=g).to(torch.float16),
        "scalar": torch.randn((), generator=g),
        "empty": torch.zeros(0, 3),
        "counter": torch.tensor([seed], dtype=torch.int64),
    }


def _assert_equal_dicts(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip(tmp_path):
    base, st = _sd(0), _sd(1)
    save_file(base, tmp_path / "base.safetensors", metadata={"format": "pt", "note": "kept"})
    save_file(st, tmp_path / "st.safetensors")
    info = merge_checkpoints(tmp_path / "base.safetensors", tmp_path / "st.safetensors", tmp_path / "out.safetensors", 1.5)
    out = load_file(tmp_path / "out.safetensors")
    _assert_equal_dicts(out, neon_merge(base, st, 1.5))
    assert info["merged"] == 5 and info["copied"] == 1  # the empty float tensor counts as merged
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "kept" and float(meta["neon_w"]) == 1.5
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left


def test_safetensors_w0_is_identical_bytes(tmp_path):
    base = _sd(0)
    save_file(base, tmp_path / "b.safetensors")
    save_file(_sd(1), tmp_path / "s.safetensors")
    merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 0.0)
    _assert_equal_dicts(load_file(tmp_path / "o.safetensors"), base)


def test_torch_state_dict_round_trip(tmp_path):
    base, st = _sd(2), _sd(3)
    torch.save(base, tmp_path / "base.pt")
    torch.save(st, tmp_path / "st.bin")
    merge_checkpoints(tmp_path / "base.pt", tmp_path / "st.bin", tmp_path / "out.pt", 1.0)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    _assert_equal_dicts(out, neon_merge(base, st, 1.0))


def _ema_ckpt(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {"lin.weight": torch.randn(3, 3, generator=g), "lin.bias": torch.randn(3, generator=g)}
    ema = {k: v + 1 for k, v in model.items()}
    return {"model": model, "ema": ema, "optimizer": {"state": {0: {"exp_avg": torch.randn(3, generator=g)}},
                                                      "param_groups": [{"lr": 0.1}]}, "step": seed}


@pytest.mark.parametrize("ema", ["ema", "model", "both"])
def test_nested_checkpoint_with_ema(tmp_path, ema):
    base, st = _ema_ckpt(0), _ema_ckpt(1)
    torch.save(base, tmp_path / "b.pt")
    torch.save(st, tmp_path / "s.pt")
    merge_checkpoints(tmp_path / "b.pt", tmp_path / "s.pt", tmp_path / "o.pt", 1.0, ema=ema)
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    for group in ("model", "ema"):
        merged = group == ema or ema == "both"
        expected = neon_merge(base[group], st[group], 1.0) if merged else base[group]
        _assert_equal_dicts(out[group], expected)
    # optimizer state and plain values are copied, int keys kept
    assert torch.equal(out["optimizer"]["state"][0]["exp_avg"], base["optimizer"]["state"][0]["exp_avg"])
    assert out["optimizer"]["param_groups"] == [{"lr": 0.1}] and out["step"] == 0


def test_flat_safetensors_with_ema_prefix(tmp_path):
    base = {"w": torch.ones(2), "ema.w": torch.full((2,), 3.0)}
    st = {"w": torch.zeros(2), "ema.w": torch.zeros(2)}
    save_file(base, tmp_path / "b.safetensors")
    save_file(st, tmp_path / "s.safetensors")
    merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["ema.w"], torch.full((2,), 6.0)) and torch.equal(out["w"], torch.ones(2))


def test_shape_mismatch_raises_and_writes_nothing(tmp_path):
    save_file({"a": torch.ones(2, 3), "b": torch.ones(1)}, tmp_path / "b.safetensors")
    save_file({"a": torch.ones(3, 2), "b": torch.ones(1)}, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="'a'"):
        merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
    assert not (tmp_path / "o.safetensors").exists()
    assert not list(tmp_path.glob(".o.safetensors*"))


def test_unrelated_checkpoints_rejected(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "b.safetensors")
    save_file({"z": torch.ones(2)}, tmp_path / "s.safetensors")
    with pytest.raises(CheckpointMismatchError, match="no tensor names in common"):
        merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)


def test_missing_keys_warn(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "b.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
    with pytest.warns(UserWarning, match="1 tensors of the base are missing"):
        merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and torch.equal(out["b"], torch.ones(2))


def test_missing_files_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="base checkpoint"):
        merge_checkpoints(tmp_path / "nope.safetensors", tmp_path / "x", tmp_path / "o", 1.0)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    save_file({"a": torch.ones(1)}, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        merge_checkpoints(tmp_path / "junk.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
    with pytest.raises(ValueError, match="w must be finite"):
        merge_checkpoints(tmp_path / "s.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", float("nan"))


# ------------------------------------------------------------------------------------------ diffusers folders


def test_diffusers_pipeline_folder(tmp_path, tiny_ddpm):
    from diffusers import UNet2DModel

    b = tiny_ddpm(tmp_path / "base", 0, ema=True)
    s = tiny_ddpm(tmp_path / "st", 1, ema=True)
    info = merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "out", 2.0)
    assert [m["folder"] for m in info["merged_folders"]] == ["unet", "unet_ema"]
    merged = UNet2DModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    expected = neon_merge(b.state_dict(), s.state_dict(), 2.0)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=0)
    # everything else copied unchanged
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        assert (tmp_path / "out" / rel).read_text() == (tmp_path / "base" / rel).read_text()
    assert json.loads((tmp_path / "out" / "neon.json").read_text())["w"] == 2.0


def test_diffusers_selftrained_as_single_file_and_model_folder(tmp_path, tiny_ddpm):
    b = tiny_ddpm(tmp_path / "base", 0)
    s = tiny_ddpm(tmp_path / "st", 1)
    weights = tmp_path / "st" / "unet" / "diffusion_pytorch_model.safetensors"
    merge_checkpoints(tmp_path / "base", weights, tmp_path / "o1", 1.0)
    merge_checkpoints(tmp_path / "base" / "unet", tmp_path / "st" / "unet", tmp_path / "o2", 1.0)
    expected = neon_merge(b.state_dict(), s.state_dict(), 1.0)
    for out in (tmp_path / "o1" / "unet", tmp_path / "o2"):
        got = load_file(out / "diffusion_pytorch_model.safetensors")
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_diffusers_missing_component(tmp_path, tiny_ddpm):
    tiny_ddpm(tmp_path / "base", 0)
    tiny_ddpm(tmp_path / "st", 1)
    with pytest.raises(MissingComponentError, match="transformer"):
        merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "o", 1.0, component="transformer")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingComponentError, match="holds no weights"):
        merge_checkpoints(empty, tmp_path / "st", tmp_path / "o", 1.0)


def test_diffusers_ema_required_on_both_sides(tmp_path, tiny_ddpm):
    tiny_ddpm(tmp_path / "base", 0, ema=True)
    tiny_ddpm(tmp_path / "st", 1, ema=False)
    with pytest.raises(MissingComponentError, match="unet_ema"):
        merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "o", 1.0)
    info = merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "o", 1.0, ema="model")
    assert [m["folder"] for m in info["merged_folders"]] == ["unet"]
    b_ema = load_file(tmp_path / "base" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    o_ema = load_file(tmp_path / "o" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    _assert_equal_dicts(o_ema, b_ema)


# ------------------------------------------------------------------------------------------ memory bound

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    import torch
    from diffusion.neon.files import merge_checkpoints

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    from safetensors.torch import save_file
    save_file({{"a": torch.ones(3)}}, {warm!r})
    merge_checkpoints({warm!r}, {warm!r}, {warm!r} + ".out", 1.0)  # one-time lazy initialisation
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak
    before = rss_kib()
    merge_checkpoints({base!r}, {st!r}, {out!r}, 1.0)
    print(json.dumps({{"peak_growth_mib": (hwm_kib() - before) / 1024}}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_streaming_merge_memory_bound(tmp_path):
    n_tensors, numel = 16, 1 << 20  # 16 tensors of 4 MiB: 64 MiB per file
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(numel, generator=g) for i in range(n_tensors)}, tmp_path / "b.safetensors")
    save_file({f"t{i}": torch.randn(numel, generator=g) for i in range(n_tensors)}, tmp_path / "s.safetensors")
    script = _MEM_SCRIPT.format(root=str(REPO_ROOT), base=str(tmp_path / "b.safetensors"),
                                st=str(tmp_path / "s.safetensors"), out=str(tmp_path / "o.safetensors"),
                                warm=str(tmp_path / "warm.safetensors"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    # loading both inputs whole needs >= 128 MiB (+ 64 MiB for the output); streaming holds a few 4 MiB tensors
    # (measured ~34 MiB incl. allocator slack): stay below the size of ONE input file
    assert growth < 64, f"peak memory grew by {growth:.1f} MiB"
    out = load_file(tmp_path / "o.safetensors")
    b, s = load_file(tmp_path / "b.safetensors"), load_file(tmp_path / "s.safetensors")
    torch.testing.assert_close(out["t7"], 2 * b["t7"] - s["t7"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ atomic writes


def test_outputs_follow_the_umask_and_replace_an_old_folder(tmp_path, tiny_ddpm):
    import os

    tiny_ddpm(tmp_path / "base", 0)
    tiny_ddpm(tmp_path / "st", 1)
    save_file(_sd(0), tmp_path / "b.safetensors")
    save_file(_sd(1), tmp_path / "s.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an older run")
    old = os.umask(0o027)
    try:
        merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
        merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "out", 1.0)
    finally:
        os.umask(old)
    assert (tmp_path / "o.safetensors").stat().st_mode & 0o777 == 0o640
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o750  # the folder renamed into place, not mkdtemp's 0700
    for rel in ("unet/diffusion_pytorch_model.safetensors", "neon.json"):
        assert (out / rel).stat().st_mode & 0o777 == 0o640, rel
    assert not (out / "stale.txt").exists()  # the old folder was replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp or old folders left


def test_failed_folder_merge_keeps_the_old_output(tmp_path, tiny_ddpm):
    tiny_ddpm(tmp_path / "base", 0)
    (tmp_path / "st").mkdir()
    save_file({"unrelated": torch.ones(2)}, tmp_path / "st" / "model.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("previous result")
    with pytest.raises(CheckpointMismatchError):
        merge_checkpoints(tmp_path / "base", tmp_path / "st", tmp_path / "out", 1.0)
    assert (tmp_path / "out" / "kept.txt").read_text() == "previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_checkpoint_is_named_and_nothing_written(tmp_path):
    save_file({"a": torch.randn(1000), "b": torch.randn(1000)}, tmp_path / "b.safetensors")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) // 2])  # a cut-off copy of the self-trained model
    with pytest.raises(ValueError, match=r"s\.safetensors' is cut short: \d+ bytes, its header describes \d+"):
        merge_checkpoints(tmp_path / "b.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", 1.0)
    assert not (tmp_path / "o.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "s.safetensors"]  # no temp file left


def test_selftrain_pipeline_folder_damage_is_named(tmp_path, tiny_ddpm):
    from diffusion.neon.selftrain import load_pipeline
    from vision.weights_io import CheckpointCorruptError

    tiny_ddpm(tmp_path / "p")
    assert load_pipeline(tmp_path / "p").unet is not None
    w = next((tmp_path / "p" / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(w))):
        load_pipeline(tmp_path / "p")
    (tmp_path / "p" / "model_index.json").write_text('{"unet": [')
    with pytest.raises(ValueError, match=r"model_index\.json: not valid JSON"):
        load_pipeline(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_truncated_or_foreign_torch_checkpoint_is_named(tmp_path):
    torch.save({"a": torch.randn(1000)}, tmp_path / "b.pt")
    data = (tmp_path / "b.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02 not a checkpoint at all")
    for bad, says in (("cut.pt", "damaged checkpoint file"), ("junk.pt", "is not a readable torch checkpoint")):
        with pytest.raises(ValueError, match=re.escape(bad) + ".*" + says if bad == "cut.pt" else says):
            merge_checkpoints(tmp_path / "b.pt", tmp_path / bad, tmp_path / "o.pt", 1.0)
        assert not (tmp_path / "o.pt").exists()
