"""`negvision generate image` picks the Perp-Neg pipeline of the folder's family (SD3, Flux) from model_index.json;
Flux-dev's guidance modes; clear exits for schnell, unknown families and `views` on a flow model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffusion.perpneg.cli import generate_app, pipeline_family

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from diffusion.perpneg.tiny import make_tiny_flux_components, make_tiny_sd3_components

    tmp = tmp_path_factory.mktemp("flow_cli")
    StableDiffusion3Pipeline(**make_tiny_sd3_components(tmp / "a")).save_pretrained(tmp / "sd3")
    FluxPipeline(**make_tiny_flux_components(tmp / "b")).save_pretrained(tmp / "flux_dev")
    schnell = make_tiny_flux_components(tmp / "c", guidance_embeds=False)
    schnell["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    FluxPipeline(**schnell).save_pretrained(tmp / "flux_schnell")
    return tmp


def _run(*args):
    return runner.invoke(generate_app, ["image", "--steps", "2", "--height", "32", "--width", "32", *args])


def _ok(*args):
    r = _run(*args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_family_of_a_class_name():
    assert pipeline_family("PerpNegFluxPipeline") == pipeline_family("FluxPipeline") == "flux"
    assert pipeline_family("StableDiffusion3Pipeline") == "sd3" and pipeline_family("") == ""
    assert pipeline_family("StableDiffusionXLPipeline") == "sdxl" and pipeline_family("WanPipeline") is None


def test_sd3_folder_runs_perp_neg_with_seed_per_image(folders, tmp_path):
    base = ["--model", str(folders / "sd3"), "--prompt", "a red cat", "--negative", "red", "--negative-weight", "2"]
    _ok(*base, "--seed", "3", "--num-images", "2", "--out", str(tmp_path / "two"))
    _ok(*base, "--seed", "4", "--out", str(tmp_path / "one"))
    s = json.loads((tmp_path / "two" / "settings.json").read_text())
    assert s["family"] == "sd3" and s["guidance"] == 7.0 and s["negative_weight"] == [2.0] and s["seeds"] == [3, 4]
    a = np.asarray(Image.open(tmp_path / "two" / "image_001.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "one" / "image_000.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # image i is seed s + i, alone or in a batch
    r = _run("--model", str(folders / "sd3"), "--prompt", "x", "--positive", "y", "--out", str(tmp_path / "p"))
    assert r.exit_code == 2 and "--positive" in r.output
    r = runner.invoke(generate_app, ["views", "--model", str(folders / "sd3"), "--prompt", "a cat", "--out",
                                     str(tmp_path / "v")])
    assert r.exit_code == 2 and "SD3" in r.output and "Stable Diffusion 1.x / 2.x" in r.output


def test_flux_dev_guidance_modes(folders, tmp_path):
    model = ["--model", str(folders / "flux_dev"), "--prompt", "a red cat"]
    _ok(*model, "--negative", "red", "--out", str(tmp_path / "neg"))
    s = json.loads((tmp_path / "neg" / "settings.json").read_text())
    assert s["family"] == "flux" and s["guidance_mode"] == "auto"
    assert s["true_cfg_scale"] == 4.0 and s["distilled_guidance"] == 3.5  # true-CFG passes + the distilled embedding
    _ok(*model, "--out", str(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "settings.json").read_text())["true_cfg_scale"] == 1.0  # one pass
    r = _run(*model, "--negative", "red", "--guidance-mode", "distilled", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "--guidance-mode cfg" in r.output
    r = _run("--model", str(folders / "sd3"), "--prompt", "x", "--guidance-mode", "distilled", "--out",
             str(tmp_path / "y"))
    assert r.exit_code == 2 and "guidance-distilled" in r.output


def test_schnell_and_unknown_families_are_one_line(folders, tmp_path):
    r = _run("--model", str(folders / "flux_schnell"), "--prompt", "a cat", "--negative", "red", "--out",
             str(tmp_path / "s"))
    assert r.exit_code == 2 and "schnell" in r.output.lower() and "Traceback" not in r.output
    index = json.loads((folders / "sd3" / "model_index.json").read_text())
    other = tmp_path / "wan"
    other.mkdir()
    for name in index:
        if not name.startswith("_") and (folders / "sd3" / name).is_dir():
            (other / name).symlink_to(folders / "sd3" / name)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    r = _run("--model", str(other), "--prompt", "a cat", "--out", str(tmp_path / "w"))
    assert r.exit_code == 2 and "WanPipeline" in r.output and "PerpNegGuidance" in r.output
    broken = tmp_path / "no_transformer"  # a component listed in model_index.json but missing: named, exit 1
    broken.mkdir()
    for name in index:
        if not name.startswith("_") and name != "transformer" and (folders / "sd3" / name).is_dir():
            (broken / name).symlink_to(folders / "sd3" / name)
    (broken / "model_index.json").write_text(json.dumps(index))
    r = _run("--model", str(broken), "--prompt", "a cat", "--out", str(tmp_path / "b"))
    assert r.exit_code == 1 and "'transformer'" in r.output and "Traceback" not in r.output
