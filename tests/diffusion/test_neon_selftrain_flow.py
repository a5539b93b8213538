"""Neon self-training of rectified-flow pipelines (SD3, Flux) on tiny random components: the loss by hand, self_train
end to end (reloadable pipeline/, only the transformer changed), `neon merge` / `neon selftrain` / `neon sweep` on the
CLI, same seed same weights, an interrupted-then-resumed run equal to the uninterrupted one, one-line errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffusion.neon.flow import (
    FluxForward,
    rectified_flow_loss,
    sample_sigmas,
    sd3_forward,
    training_sigmas,
)
from diffusion.neon.selftrain import (
    ConditioningError,
    SelfTrainConfig,
    load_pipeline,
    self_train,
)
from diffusion.perpneg.tiny import make_tiny_flux_components, make_tiny_sd3_components
from vision.cli import app
from vision.engine import RunOptions, TrainConfig

runner = CliRunner()
PROMPTS = ["a red square", "a blue cat"]
WEIGHTS = "diffusion_pytorch_model.safetensors"
# tiny Flux: 32x32 images (FluxPipeline's default 128 * vae_scale_factor is 256) and 24 T5 tokens
SIZE = {"sd3": {}, "flux": dict(height=32, width=32, max_sequence_length=24)}
SETTINGS = dict(num_samples=4, sample_batch_size=2, prompts=PROMPTS, num_inference_steps=2)
TRAIN = TrainConfig(max_steps=3, batch_size=2, lr=1e-2)


def _run(out, **kw):
    return RunOptions(out=out, progress=False, device="cpu", **kw)  # bit-identical weights for one seed: the CPU rule


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Stock SD3 and Flux pipeline folders of tiny random components."""
    root = tmp_path_factory.mktemp("flow")
    StableDiffusion3Pipeline(**make_tiny_sd3_components(root / "sd3_parts", seed=0)).save_pretrained(root / "sd3")
    FluxPipeline(**make_tiny_flux_components(root / "flux_parts", seed=0)).save_pretrained(root / "flux")
    return root


class _Stub(torch.nn.Module):
    """A transformer predicting zeros; records the keyword arguments of its last call."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, hidden_states, **kw):
        self.seen = {"hidden_states": hidden_states, **kw}
        return (torch.zeros_like(hidden_states),)


def _draws(x0, sigmas, seed=0):
    """eps and sigma as the loss draws them (eps first, then u), from ``seed``."""
    torch.manual_seed(seed)
    eps = torch.randn_like(x0)
    return eps, sample_sigmas(x0.shape[0], sigmas)


def test_sd3_loss_by_hand():
    sigmas, n = training_sigmas({"num_train_timesteps": 1000, "shift": 3.0})
    s0 = torch.arange(1000, 0, -1) / 1000
    torch.testing.assert_close(sigmas, 3 * s0 / (1 + 2 * s0))  # the scheduler's static shift, as SD3's script
    x0, pe, pooled = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 8), torch.randn(3, 8)
    stub = _Stub()
    torch.manual_seed(0)
    loss = rectified_flow_loss(sd3_forward, sigmas, num_train_timesteps=n)(stub, (x0, pe, pooled))["loss"]
    eps, sigma = _draws(x0, sigmas)
    assert sigma.shape == (3,) and bool(((sigma > 0) & (sigma <= 1)).all())
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(stub.seen["hidden_states"], (1 - s) * x0 + s * eps)  # x_t
    torch.testing.assert_close(stub.seen["timestep"], sigma * 1000)  # SD3: t in [0, 1000]
    assert stub.seen["encoder_hidden_states"] is pe and stub.seen["pooled_projections"] is pooled
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())  # a zero prediction: mean((eps - x0)^2)

    def perfect(hidden_states, timestep, **kw):  # the true velocity v = eps - x0, recovered from x_t and sigma
        s = (timestep / 1000).view(-1, 1, 1, 1)
        return ((hidden_states - (1 - s) * x0) / s - x0,)

    loss = rectified_flow_loss(sd3_forward, sigmas)(perfect, (x0, pe, pooled))["loss"]
    assert float(loss) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("guidance", [3.5, None])
def test_flux_loss_by_hand(guidance):
    sigmas, n = training_sigmas({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    torch.testing.assert_close(sigmas, torch.arange(1000, 0, -1) / 1000)  # dynamic shifting: no shift in training
    x0, pe, pooled, text_ids = torch.randn(2, 4, 4, 6), torch.randn(2, 7, 8), torch.randn(2, 8), torch.zeros(7, 3)
    stub = _Stub()
    torch.manual_seed(0)
    fwd = FluxForward(FluxPipeline, text_ids, guidance)
    loss = rectified_flow_loss(fwd, sigmas, num_train_timesteps=n)(stub, (x0, pe, pooled))["loss"]
    eps, sigma = _draws(x0, sigmas)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    torch.testing.assert_close(stub.seen["hidden_states"], FluxPipeline._pack_latents(x_t, 2, 4, 4, 6))  # 2x2 packed
    assert stub.seen["hidden_states"].shape == (2, 2 * 3, 16)
    torch.testing.assert_close(stub.seen["timestep"], sigma)  # Flux: t / 1000
    torch.testing.assert_close(stub.seen["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", x0.dtype))
    assert torch.equal(stub.seen["txt_ids"], text_ids)
    if guidance is None:
        assert stub.seen["guidance"] is None
    else:
        assert stub.seen["guidance"].tolist() == [guidance, guidance]
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())
    # the unpacked prediction is laid out as the latents: packing then unpacking is the identity
    torch.testing.assert_close(FluxPipeline._unpack_latents(FluxPipeline._pack_latents(x_t, 2, 4, 4, 6), 4, 6, 1), x_t)


def _transformer(folder):
    return load_file(str(folder / "transformer" / WEIGHTS))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_selftrain_merge_same_seed_and_resume(bases, tmp_path, family, monkeypatch):
    base = bases / family
    info = self_train(base, SelfTrainConfig(**SETTINGS, **SIZE[family]), TRAIN, _run(tmp_path / "a"))
    assert info["component"] == "transformer" and info["steps"] == 3 and info["num_samples"] == 4
    run = tmp_path / "a" / "pipeline"
    before, after = _transformer(base), _transformer(run)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    for sub in ("vae", "text_encoder", "text_encoder_2"):  # the other components: byte-identical weights
        for f in (base / sub).glob("*.safetensors"):
            assert f.read_bytes() == (run / sub / f.name).read_bytes(), f
    extra = json.loads((tmp_path / "a" / "train" / "config.json").read_text())["extra"]["neon"]
    assert extra["loss"] == "rectified_flow" and extra["sigma_sampling"] == "logit_normal"
    if family == "flux":
        assert extra["guidance"] == 3.5  # the distilled embedding at the pipeline's default sampling guidance
    # pipeline/ reloads, with diffusers (SD3 without T5: text_encoder_3 / tokenizer_3 passed as None) and load_pipeline
    nulls = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    reloaded = DiffusionPipeline.from_pretrained(str(run), local_files_only=True, **nulls)
    assert type(reloaded).__name__ == type(load_pipeline(run)).__name__ == ("StableDiffusion3Pipeline"
                                                                          if family == "sd3" else "FluxPipeline")

    # neon merge on the CLI: theta = 2 * base - selftrained at w = 1; the merged folder is a pipeline
    r = runner.invoke(app, ["neon", "merge", "--base", str(base), "--selftrained", str(run), "--w", "1",
                            "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["component"] == "transformer"
    merged = _transformer(tmp_path / "merged")
    k = next(k for k in before if not torch.equal(before[k], after[k]))
    torch.testing.assert_close(merged[k], 2 * before[k] - after[k])
    load_pipeline(tmp_path / "merged")
    if family == "flux":  # sweep (SD3's is on the CLI below): Flux samples at the given size, references resized to it
        from diffusion.neon.sweep import SweepConfig, neon_sweep

        res = neon_sweep(base, run, [0.0, 1.0], tmp_path / "sweep", reference=torch.rand(6, 3, 40, 40),
                         config=SweepConfig(features="pixels:2", num_samples=4, batch_size=4, prompts=PROMPTS,
                                            num_inference_steps=2, k=2, **SIZE[family]), progress=False)
        assert res["best_w"] in (0.0, 1.0) and len(res["rows"]) == 2

    # same seed, same weights
    self_train(base, SelfTrainConfig(**SETTINGS, **SIZE[family]), TRAIN, _run(tmp_path / "b"))
    again = _transformer(tmp_path / "b" / "pipeline")
    assert all(torch.equal(after[k], again[k]) for k in after)

    # stopped after step 1 (a checkpoint with the generators' states), resumed: the uninterrupted run's weights
    from vision.engine import TrainingInterrupted
    from vision.engine.trainer import Trainer

    emit = Trainer._emit

    def stop_at_1(self, event, info):
        emit(self, event, info)
        if event == "step_end" and info["step"] == 1:
            self.request_stop()

    monkeypatch.setattr(Trainer, "_emit", stop_at_1)
    with pytest.raises(TrainingInterrupted):
        self_train(base, SelfTrainConfig(**SETTINGS, **SIZE[family]), TRAIN, _run(tmp_path / "c"))
    monkeypatch.setattr(Trainer, "_emit", emit)
    assert self_train(base, SelfTrainConfig(**SETTINGS, **SIZE[family]), TRAIN,
                      _run(tmp_path / "c", resume=True))["steps"] == 3
    resumed = _transformer(tmp_path / "c" / "pipeline")
    assert all(torch.equal(after[k], resumed[k]) for k in after)


def test_sd3_cli_selftrain_and_sweep(bases, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(ref / f"{i}.png")
    common = ["--prompts", str(tmp_path / "p.txt"), "--num-inference-steps", "2", "--device", "cpu"]
    r = runner.invoke(app, ["neon", "selftrain", "--model", str(bases / "sd3"), "--num-samples", "4",
                            "--max-steps", "2", "--batch", "2", "--sample-batch-size", "4", "--out",
                            str(tmp_path / "st"), *common])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2
    r = runner.invoke(app, ["neon", "sweep", "--base", str(bases / "sd3"), "--selftrained",
                            str(tmp_path / "st" / "pipeline"), "--w", "0,1", "--reference", str(ref), "--out",
                            str(tmp_path / "sweep"), "--features", "pixels:2", "--num-samples", "4", "--batch", "4",
                            *common])
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["best_w"] in (0.0, 1.0) and (tmp_path / "sweep" / "samples" / "w1.png").is_file()
    # Flux from the command line at a chosen size and T5 length (its pipeline default is 256 px on the tiny VAE)
    r = runner.invoke(app, ["neon", "selftrain", "--model", str(bases / "flux"), "--num-samples", "2", "--max-steps",
                            "1", "--batch", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16",
                            "--out", str(tmp_path / "fx"), *common])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert Image.open(tmp_path / "fx" / "samples.png").size[1] <= 40  # one row of 32 px samples (grid padding)


def test_flow_errors_are_one_line(bases, tmp_path):
    with pytest.raises(ConditioningError, match="needs a prompt list"):
        self_train(bases / "flux", SelfTrainConfig(num_samples=2), TrainConfig(max_steps=1),
                   RunOptions(out=tmp_path / "x", progress=False))
    r = runner.invoke(app, ["neon", "selftrain", "--model", str(bases / "sd3"), "--num-samples", "2",
                            "--max-steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 2 and "needs a prompt list" in r.output and not (tmp_path / "o").exists()
    # a flow pipeline without its VAE / a text encoder: one line naming the component (exit 1 on the CLI)
    comps = make_tiny_sd3_components(tmp_path / "parts")
    StableDiffusion3Pipeline(**{**comps, "vae": None}).save_pretrained(tmp_path / "no_vae")
    (tmp_path / "p.txt").write_text("a cat\n")
    r = runner.invoke(app, ["neon", "selftrain", "--model", str(tmp_path / "no_vae"), "--prompts",
                            str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 1 and "needs a pipeline with 'vae'" in r.output and not (tmp_path / "o").exists()
    assert len(r.output.strip().splitlines()) == 1, r.output
    comps = make_tiny_flux_components(tmp_path / "parts")
    FluxPipeline(**{**comps, "text_encoder_2": None, "tokenizer_2": None}).save_pretrained(tmp_path / "no_t5")
    with pytest.raises(NotImplementedError, match="needs a pipeline with 'text_encoder_2'"):
        self_train(tmp_path / "no_t5", SelfTrainConfig(prompts=["a cat"], num_samples=2),
                   TrainConfig(max_steps=1), RunOptions(out=tmp_path / "o", progress=False))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_perpneg_subclass_folders_selftrain(tmp_path, family):
    # a folder whose model_index.json names negvision's Perp-Neg subclass loads as it, and pipeline/ keeps the class
    if family == "sd3":
        from diffusion.perpneg.pipeline_sd3 import PerpNegStableDiffusion3Pipeline as cls

        comps = make_tiny_sd3_components(tmp_path / "parts")
    else:
        from diffusion.perpneg.pipeline_flux import PerpNegFluxPipeline as cls

        comps = make_tiny_flux_components(tmp_path / "parts")
    cls(**comps).save_pretrained(tmp_path / "base")
    assert type(load_pipeline(tmp_path / "base")) is cls
    info = self_train(tmp_path / "base", SelfTrainConfig(**{**SETTINGS, "num_samples": 2}, **SIZE[family]),
                      dataclasses.replace(TRAIN, max_steps=1), _run(tmp_path / "st"))
    assert info["steps"] == 1
    index = json.loads((tmp_path / "st" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__ and type(load_pipeline(tmp_path / "st" / "pipeline")) is cls


def test_sd3_killed_then_resumed_equals_never_killed(bases, tmp_path):
    from _repro import assert_same_weights, checkpoint_step, cli_ok, kill_after_step

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["neon", "selftrain", "--model", str(bases / "sd3"), "--prompts", str(tmp_path / "p.txt"), "--num-samples",
            "4", "--max-steps", "4", "--save-every", "2", "--batch", "2", "--sample-batch-size", "4",
            "--num-inference-steps", "2", "--device", "cpu"]
    cli_ok(*args, "--out", str(tmp_path / "ref"))
    run = tmp_path / "run"
    kill_after_step([*args, "--out", str(run)], 3, tmp_path)
    assert checkpoint_step(run, "train") == 2
    cli_ok(*args[:4], "--out", str(run), "--resume")  # the base model; the rest is the run's own
    assert_same_weights(tmp_path / "ref", run, "train/checkpoints/last/model.safetensors")
