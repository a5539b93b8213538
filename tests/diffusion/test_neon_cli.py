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
    assert r.exit_code == 2 and "'all' is not one of 'ema', 'model', 'both'" in r.output  # an enum: click lists them
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


# ---------------------------------------------------------------------- the shared options (vision.cli_options)
def _selftrain_args(workdir):
    return ["neon", "selftrain", "--model", str(workdir / "base"), "--num-samples", "4", "--batch", "2",
            "--sample-batch-size", "4", "--num-inference-steps", "2", "--device", "cpu"]


def test_selftrain_writes_config_yaml_and_replays_it(workdir, tmp_path):
    import yaml

    from vision.cli import app

    run = tmp_path / "a"
    info = _json(runner.invoke(app, [*_selftrain_args(workdir), "--steps", "2", "--lr", "0.0003", "--out", str(run)]))
    assert info["steps"] == 2 and info["out"] == str(run)  # --steps: the old spelling of --max-steps
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["max_steps"] == 2 and cfg["lr"] == 0.0003 and cfg["batch"] == 2 and cfg["amp"] == "auto"
    assert cfg["model"] == str(workdir / "base") and "resume" not in cfg and "config" not in cfg and "steps" not in cfg
    cfg["out"] = str(tmp_path / "b")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    info = _json(runner.invoke(app, ["neon", "selftrain", "--config", str(tmp_path / "b.yaml"), "--seed", "3"]))
    assert info["steps"] == 2 and info["out"] == str(tmp_path / "b")
    replay = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in replay.items() if k != "seed"} == {k: v for k, v in cfg.items() if k != "seed"}
    assert replay["seed"] == 3  # the command line wins over the file
    meta = json.loads((tmp_path / "b" / "train" / "config.json").read_text())
    assert meta["train"]["lr"] == 0.0003 and meta["train"]["max_steps"] == 2


def test_selftrain_resume_exist_ok_and_next_free_folder(workdir, tmp_path):
    import yaml

    from vision.cli import app

    run = tmp_path / "r"
    args = _selftrain_args(workdir)
    assert _json(runner.invoke(app, [*args, "--max-steps", "2", "--out", str(run)]))["steps"] == 2
    # bare --resume (the root group makes it "last"): continue train/checkpoints/last up to the new --max-steps
    info = _json(runner.invoke(app, [*args, "--max-steps", "4", "--out", str(run), "--resume"]))
    assert info["steps"] == 4 and info["out"] == str(run)
    assert json.loads((run / "train" / "summary.json").read_text())["steps"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2  # the first run's options stay
    assert yaml.safe_load((run / "config.resumed.yaml").read_text())["max_steps"] == 4
    # --resume PATH: that checkpoint folder
    ck = run / "train" / "checkpoints" / "last"
    assert _json(runner.invoke(app, [*args, "--max-steps", "5", "--out", str(run), "--resume", str(ck)]))["steps"] == 5
    r = runner.invoke(app, [*args, "--out", str(run), "--resume", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such checkpoint folder" in r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "empty"), "--resume"])
    assert r.exit_code == 1 and "holds no checkpoints" in r.output
    # a new run into a used folder goes to NAME2; --exist-ok reuses the folder, starting afresh
    info = _json(runner.invoke(app, [*args, "--max-steps", "1", "--out", str(run)]))
    assert info["out"] == str(tmp_path / "r2") and info["steps"] == 1
    info = _json(runner.invoke(app, [*args, "--max-steps", "1", "--out", str(run), "--exist-ok"]))
    assert info["out"] == str(run) and info["steps"] == 1
    assert json.loads((run / "train" / "summary.json").read_text())["steps"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 1


@pytest.mark.parametrize("args, allowed", [
    (["merge", "--base", "b", "--selftrained", "s", "--ema", "all"], "'ema', 'model', 'both'"),
    (["selftrain", "--model", "m", "--amp", "maybe"], "'auto', 'no', 'fp16', 'bf16'"),
])
def test_a_wrong_choice_exits_2_listing_the_allowed_values(tmp_path, args, allowed):
    from vision.cli import app

    r = runner.invoke(app, ["neon", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and allowed in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_selftrain_bad_device_is_a_usage_error(workdir, tmp_path):
    from vision.cli import app

    r = runner.invoke(app, [*_selftrain_args(workdir)[:-2], "--device", "tpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "expected cpu, cuda, cuda:N or mps" in r.output
    assert not (tmp_path / "o").exists()
