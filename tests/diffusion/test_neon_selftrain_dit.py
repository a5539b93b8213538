"""Neon self-training of a class-conditional latent transformer (DiT) pipeline, on a tiny random DiT."""

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from diffusion.neon.selftrain import (
    SelfTrainConfig,
    denoising_loss,
    is_dit,
    num_classes,
    sample_images,
    self_train,
)
from vision.engine import RunOptions, TrainConfig


def _tiny_dit(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(),
                       id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_learned_sigma_output_uses_the_mean_half_only():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=10)
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2)
    seen = {}

    def model(x_t, t, class_labels=None):
        # a perfect epsilon predictor in the first half, garbage in the variance half
        noise = (x_t - sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * x0) / (
            1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        seen["labels"] = class_labels
        return types.SimpleNamespace(sample=torch.cat([noise, torch.full_like(noise, 1e3)], dim=1))

    out = denoising_loss(sched, class_conditional=True)(model, (x0, torch.tensor([0, 1, 2])))
    assert float(out["loss"]) == pytest.approx(0.0, abs=1e-8)
    assert seen["labels"].tolist() == [0, 1, 2]


def test_dit_selftrain(tmp_path):
    pipe = _tiny_dit()
    assert is_dit(pipe.transformer) and num_classes(pipe) == 1000
    # a DiT pipeline needs class labels: without any, every class is sampled in turn
    imgs, conds = sample_images(pipe, 3, batch_size=2, num_inference_steps=2)
    assert imgs.shape == (3, 3, 16, 16) and conds == [0, 1, 2]
    base = tmp_path / "base"
    pipe.save_pretrained(str(base), safe_serialization=True)
    info = self_train(base, SelfTrainConfig(num_samples=4, sample_batch_size=2, class_labels=[0, 1],
                                            num_inference_steps=2, guidance_scale=1.0),
                      TrainConfig(max_steps=2, batch_size=2, lr=1e-2), RunOptions(out=tmp_path / "self", progress=False))
    assert info["component"] == "transformer" and info["steps"] == 2
    name = "diffusion_pytorch_model.safetensors"
    before = load_file(str(base / "transformer" / name))
    after = load_file(str(tmp_path / "self" / "pipeline" / "transformer" / name))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the transformer was fine-tuned
    vb, va = load_file(str(base / "vae" / name)), load_file(str(tmp_path / "self" / "pipeline" / "vae" / name))
    assert all(torch.equal(vb[k], va[k]) for k in vb)  # the VAE is untouched
    assert json.loads((tmp_path / "self" / "selftrain.json").read_text())["num_samples"] == 4
    from diffusers import DiTPipeline

    tuned = DiTPipeline.from_pretrained(str(tmp_path / "self" / "pipeline"))
    tuned.set_progress_bar_config(disable=True)
    imgs, _ = sample_images(tuned, 2, class_labels=[1], num_inference_steps=2)
    assert imgs.shape == (2, 3, 16, 16)
    # merge + sweep on the DiT pipeline (class labels default to every class in turn)
    from diffusion.neon.sweep import SweepConfig, neon_sweep

    res = neon_sweep(base, tmp_path / "self" / "pipeline", [0.0, 1.0], tmp_path / "sweep",
                     reference=torch.rand(8, 3, 16, 16),
                     config=SweepConfig(features="pixels", num_samples=4, batch_size=2, num_inference_steps=2, k=2),
                     progress=False)
    assert (tmp_path / "sweep" / "sweep.csv").is_file() and res["best_w"] in (0.0, 1.0)


def test_dit_rejects_prompts(tmp_path):
    base = tmp_path / "base"
    _tiny_dit().save_pretrained(str(base), safe_serialization=True)
    with pytest.raises(ValueError, match="class-conditional"):
        self_train(base, SelfTrainConfig(num_samples=2, prompts=["a cat"]), TrainConfig(max_steps=1),
                   RunOptions(out=tmp_path / "self", progress=False))
