"""`negvision neon` merge / selftrain / sweep end to end on a tiny UNet2DModel DDPM and a tiny feature extractor."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffusion.neon.cli import neon_app

REPO_ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_ddpm):
    root = tmp_path_factory.mktemp("neon")
    tiny_ddpm(root / "base", num_train_timesteps=20)
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(ref / f"{i:02d}.png")
    return root


def _json(result) -> dict:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_selftrain_merge_sweep_end_to_end(workdir):
    st = workdir / "st"
    info = _json(runner.invoke(neon_app, [
        "selftrain", "--model", str(workdir / "base"), "--num-samples", "16", "--steps", "4", "--save-every", "2",
        "--batch-size", "8", "--num-inference-steps", "4", "--out", str(st), "--device", "cpu",
    ]))
    assert info["num_samples"] == 16 and info["steps"] == 4
    assert (st / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (st / "samples.png").exists() and (st / "train" / "summary.json").exists()
    assert [Path(p).name for p in info["checkpoints"]] == ["step-0000002"]  # every 2 steps; "last" is step 4

    # merge: pipeline folder + a saved engine checkpoint directory
    merged = _json(runner.invoke(neon_app, [
        "merge", "--base", str(workdir / "base"), "--selftrained", str(st / "train" / "checkpoints" / "last"),
        "--w", "1.0", "--out", str(workdir / "merged"),
    ]))
    assert merged["merged_folders"][0]["merged"] > 0
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(workdir / "merged")  # the merged folder is a loadable pipeline

    out = workdir / "sweep"
    summary = _json(runner.invoke(neon_app, [
        "sweep", "--base", str(workdir / "base"), "--selftrained", str(st / "pipeline"), "--w", "0,1,2",
        "--reference", str(workdir / "ref"), "--out", str(out), "--features", "pixels:2",  # tiny 4-d extractor
        "--num-samples", "12", "--num-inference-steps", "4", "--device", "cpu",
    ]))
    assert summary["best_w"] in (0.0, 1.0, 2.0)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["w"]) for r in rows] == [0.0, 1.0, 2.0]
    assert all(float(r["fid"]) >= 0 and 0 <= float(r["precision"]) <= 1 for r in rows)
    assert summary["best_fid"] == pytest.approx(min(float(r["fid"]) for r in rows), rel=1e-4)
    assert (out / "fid_vs_w.png").exists() and (out / "samples" / "w1.png").exists()


def test_merge_cli_errors(workdir, tmp_path):
    r = runner.invoke(neon_app, ["merge", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "nan", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "w must be finite" in r.output
    r = runner.invoke(neon_app, ["merge", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "1", "--component", "transformer", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no component 'transformer'" in r.output  # the model folder lacks it: exit 1
    r = runner.invoke(neon_app, ["merge", "--base", str(tmp_path / "nope"), "--selftrained", str(workdir / "base"),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output  # a missing file: exit 1


def test_merge_cli_usage_errors_exit_2(workdir, tmp_path):
    args = ["merge", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base")]
    r = runner.invoke(neon_app, [*args, "--ema", "all", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "ema must be one of" in r.output
    r = runner.invoke(neon_app, [*args, "--out", str(workdir / "base")])
    assert r.exit_code == 2 and "must differ from the inputs" in r.output
    assert not (tmp_path / "o").exists()


def test_merge_cli_negative_w_warns_once(workdir, tmp_path):
    r = runner.invoke(neon_app, ["merge", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "-0.5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: w=-0.5 < 0") == 1


def test_selftrain_cli_errors(workdir, tmp_path):
    base = ["selftrain", "--model", str(workdir / "base"), "--num-samples", "2", "--steps", "1", "--device", "cpu"]
    r = runner.invoke(neon_app, [*base, "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "prompts file" in r.output  # a missing file
    (tmp_path / "p.txt").write_text("a cat\n")
    r = runner.invoke(neon_app, [*base, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "drop --prompts" in r.output  # an option the (unconditional) model cannot take
    r = runner.invoke(neon_app, [*base, "--class-labels", "1,x", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "bad --class-labels" in r.output
    r = runner.invoke(neon_app, ["selftrain", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and "model_index.json" in r.output


def test_sweep_cli_bad_w(workdir, tmp_path):
    r = runner.invoke(neon_app, ["sweep", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "0,abc", "--reference", str(workdir / "ref"), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "bad w value 'abc'" in r.output
    r = runner.invoke(neon_app, ["sweep", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "0,1", "--reference", str(workdir / "ref"), "--out", str(tmp_path / "s"),
                                 "--features", "bogus", "--num-samples", "2", "--num-inference-steps", "1",
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "unknown feature extractor spec 'bogus'" in r.output
    r = runner.invoke(neon_app, ["sweep", "--base", str(workdir / "base"), "--selftrained", str(workdir / "base"),
                                 "--w", "0,1", "--reference", str(tmp_path / "no_ref"), "--out", str(tmp_path / "s"),
                                 "--num-samples", "2", "--num-inference-steps", "1", "--device", "cpu"])
    assert r.exit_code == 1 and "reference folder" in r.output  # missing input data


def test_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from diffusion.neon.cli import neon_app;"
        "r = CliRunner().invoke(neon_app, ['--help']); assert r.exit_code == 0, r.output;"
        "assert all(c in r.output for c in ('merge', 'selftrain', 'sweep')), r.output;"
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
