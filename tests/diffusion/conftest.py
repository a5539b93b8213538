"""Shared fixtures for the diffusion tests."""

from pathlib import Path

import pytest
import torch


def _tiny_ddpm(path: Path, seed: int = 0, num_train_timesteps: int = 10, ema: bool = False):
    """Save a tiny random DDPM pipeline (1-channel 8x8 UNet2DModel) to ``path`` (+ ``unet_ema/`` if ``ema``);
    returns the UNet."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, add_attention=False,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)).save_pretrained(path)
    if ema:
        unet.save_pretrained(path / "unet_ema")
    return unet


@pytest.fixture(scope="session")
def tiny_ddpm():
    """The builder of a tiny random DDPM pipeline folder: ``tiny_ddpm(path, seed, num_train_timesteps, ema)``."""
    return _tiny_ddpm
