"""`negvision generate` image / views / 3d end to end on a tiny saved pipeline; clear error for missing weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusion.perpneg.cli import generate_app

REPO_ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffusion.perpneg.tiny import make_tiny_pipeline

    tmp = tmp_path_factory.mktemp("perpneg_cli")
    make_tiny_pipeline(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def _ok(args):
    res = runner.invoke(generate_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_image_command_is_reproducible(model_dir, tmp_path):
    args = ["image", "--model", str(model_dir), "--prompt", "a cat", "--negative", "a dog", "--negative-weight", "1.5",
            "--negative", "grass", "--negative-weight", "0.5", "--steps", "2", "--seed", "3", "--num-images", "2"]
    _ok([*args, "--out", str(tmp_path / "a")])
    _ok([*args, "--out", str(tmp_path / "b")])
    s = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert s["negative"] == ["a dog", "grass"] and s["negative_weight"] == [1.5, 0.5] and s["seed"] == 3
    assert s["amp"] == "auto"
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    assert (tmp_path / "a" / "image_001.png").is_file()


def test_image_i_uses_seed_plus_i(model_dir, tmp_path):
    """--seed s gives image i the seed s + i, so `--seed s+i --num-images 1` regenerates image i alone."""
    import numpy as np
    from PIL import Image

    base = ["image", "--model", str(model_dir), "--prompt", "a cat", "--negative", "a dog", "--steps", "2",
            "--uncond", "blurry"]
    _ok([*base, "--seed", "3", "--num-images", "2", "--out", str(tmp_path / "two")])
    _ok([*base, "--seed", "4", "--num-images", "1", "--out", str(tmp_path / "one")])
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["seeds"] == [3, 4]
    a = np.asarray(Image.open(tmp_path / "two" / "image_001.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "one" / "image_000.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # the same image (up to a rounding step of the batch of 2)
    c = np.asarray(Image.open(tmp_path / "two" / "image_000.png"), dtype=int)
    assert np.abs(a - c).max() > 10  # and the two images differ


def test_views_command(model_dir, tmp_path):
    _ok(["views", "--model", str(model_dir), "--prompt", "a corgi", "--views", "front,side,back", "--steps", "2",
         "--schedule", "dreamfusion", "--out", str(tmp_path)])
    s = json.loads((tmp_path / "settings.json").read_text())
    assert s["negative_weights"]["back"][1] == pytest.approx(2.0)  # stable-dreamfusion: front pushed with -negative_w
    assert all((tmp_path / f"view_{v}.png").is_file() for v in ("front", "side", "back"))


def test_3d_command(model_dir, tmp_path):
    _ok(["3d", "--model", str(model_dir), "--prompt", "a corgi", "--iters", "2", "--grid-res", "8", "--render-res",
         "16", "--samples", "8", "--preview-every", "1", "--out", str(tmp_path)])
    for name in ("turntable.gif", "mesh.obj", "mesh.ply", "grid.safetensors", "grid.json", "settings.json", "log.csv"):
        assert (tmp_path / name).is_file(), name


def test_missing_weights_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(generate_app, ["image", "--model", "nobody/not-a-model", "--prompt", "x", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "--model a local folder" in res.output  # missing weights: exit 1
    for local in ("./weights/sd15", str(tmp_path / "nope"), "weights/sd/v1", "~/models/sd"):
        res = runner.invoke(generate_app, ["image", "--model", local, "--prompt", "x", "--out", str(tmp_path)])
        assert res.exit_code == 1 and f"--model {local}: no such folder" in res.output, res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(generate_app, ["image", "--model", str(tmp_path / "empty"), "--prompt", "x", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "model_index.json" in res.output  # not a pipeline folder: exit 1


@pytest.mark.parametrize("damage, says", [
    ("index_cut", "model_index.json: not valid JSON"),
    ("component_gone", "lists the component 'unet' but"),
    ("weights_cut", "damaged checkpoint file"),
    ("config_gone", "could not load the pipeline folder"),
])
def test_damaged_local_pipeline_folder_names_the_file(model_dir, tmp_path, damage, says):
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(model_dir, pipe)
    if damage == "index_cut":
        (pipe / "model_index.json").write_text((pipe / "model_index.json").read_text()[:30])
    elif damage == "component_gone":
        shutil.rmtree(pipe / "unet")
    elif damage == "weights_cut":
        w = next((pipe / "unet").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        (pipe / "unet" / "config.json").unlink()
    res = runner.invoke(generate_app, ["image", "--model", str(pipe), "--prompt", "x", "--steps", "1",
                                       "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    last = res.output.strip().splitlines()[-1]
    assert says in last and "download" not in last.split("(")[0], res.output


@pytest.mark.parametrize("args, message", [
    (["image", "--negative", "a", "--negative", "b", "--negative-weight", "1", "--negative-weight", "2",
      "--negative-weight", "3"], "3 --negative-weight values for 2 --negative prompts"),
    (["image", "--negative", "a", "--negative-weight", "-1"], "--negative-weight must be >= 0"),
    (["views", "--views", "front,upside"], "bad --views 'front,upside'"),
    (["views", "--schedule", "other"], "'other' is not one of 'threestudio', 'dreamfusion'"),  # an enum
    (["3d", "--schedule", "other"], "'other' is not one of 'threestudio', 'dreamfusion'"),
    (["image", "--amp", "half"], "'half' is not one of 'auto', 'no', 'fp16', 'bf16'"),
    (["image", "--device", "cpu", "--amp", "fp16"], "--amp fp16 needs a GPU"),
    (["views", "--device", "tpu"], "expected cpu, cuda, cuda:N or mps"),
])
def test_bad_option_values_exit_2(tmp_path, args, message):
    res = runner.invoke(generate_app, [args[0], "--model", str(tmp_path / "unused"), "--prompt", "x", *args[1:],
                                       "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_results_follow_the_umask(model_dir, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        _ok(["image", "--model", str(model_dir), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "o")])
    finally:
        os.umask(old)
    for name in ("image_000.png", "grid.png", "settings.json"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o640, name
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # no temp files left


def test_help_does_not_import_diffusers():
    code = ("import sys; from typer.testing import CliRunner; from diffusion.perpneg.cli import generate_app; "
            "r = CliRunner().invoke(generate_app, ['--help']); assert r.exit_code == 0 and '3d' in r.output; "
            "assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
