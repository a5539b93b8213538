"""Neon self-training of a text-to-image (latent, text-conditioned) pipeline on a tiny Stable Diffusion."""

import json

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffusion.neon.selftrain import SelfTrainConfig, self_train
from diffusion.perpneg.tiny import make_tiny_pipeline
from vision.engine import RunOptions, TrainConfig


def test_text_to_image_selftrain(tmp_path):
    pipe = make_tiny_pipeline(tmp_path / "parts", cls=StableDiffusionPipeline)
    base = tmp_path / "base"
    pipe.save_pretrained(str(base), safe_serialization=True)
    info = self_train(base, SelfTrainConfig(num_samples=4, sample_batch_size=2, prompts=["a red square", "a blue circle"],
                                            num_inference_steps=2),
                      TrainConfig(max_steps=2, batch_size=2, lr=1e-2), RunOptions(out=tmp_path / "self", progress=False))
    assert info["component"] == "unet" and info["steps"] == 2
    before = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "self" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the UNet was fine-tuned
    # the text encoder and VAE are untouched
    tb = load_file(str(base / "text_encoder" / "model.safetensors"))
    ta = load_file(str(tmp_path / "self" / "pipeline" / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(tb[k], ta[k]) for k in tb)
    assert json.loads((tmp_path / "self" / "selftrain.json").read_text())["num_samples"] == 4
    # the self-trained pipeline loads and samples
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "self" / "pipeline"))
