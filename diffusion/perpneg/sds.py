"""Perp-Neg score distillation (SDS): rendered RGB + camera angles in, SDS loss out; one batched UNet call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .guidance import perp_neg_guidance
from .views import encode_view_prompts, view_conditioned_embeddings

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_epsilon(model_output: Tensor, z_t: Tensor, alpha_bar: Tensor, prediction_type: str = "epsilon") -> Tensor:
    """The noise estimate eps of a UNet output, whatever the scheduler's ``prediction_type``.

    With z_t = sqrt(a) z_0 + sqrt(1 - a) eps (a = alpha_bar_t):
    epsilon: eps = out; v_prediction (v = sqrt(a) eps - sqrt(1 - a) z_0, Salimans & Ho 2022):
    eps = sqrt(a) v + sqrt(1 - a) z_t; sample (out = z_0): eps = (z_t - sqrt(a) z_0) / sqrt(1 - a).
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * z_t  # eps = sqrt(a) v + sqrt(1-a) z_t
    if prediction_type == "sample":
        return (z_t - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()  # eps = (z_t - sqrt(a) z_0) / sqrt(1-a)
    raise ValueError(f"prediction_type '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")


class PerpNegSDS(nn.Module):
    """SDS loss with view-conditioned Perp-Neg guidance (DreamFusion + Armandpour et al. 2023).

    grad_z = w(t) * (eps_hat(z_t; views) - eps), w(t) = 1 - alpha_bar_t, t ~ U[0.02, 0.98] * T, eps_hat the
    Perp-Neg estimate over [uncond, pos, neg_1, neg_2] computed in ONE UNet call of 4B samples.

    Args:
        unet: the diffusers UNet2DConditionModel (frozen here); called as ``unet(z_t, t, encoder_hidden_states=...)``.
        vae: the AutoencoderKL whose encoder maps the renders to latents (frozen; gradients flow through it).
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.num_train_timesteps`` (T).
        view_embeds: text embeddings [1, L, D] (or [L, D]) of the views 'front', 'side', 'back', 'overhead'
            and of 'uncond', as from :func:`diffusion.perpneg.views.encode_view_prompts`.
        guidance_scale: s of the Perp-Neg estimate (default 100, as in DreamFusion's SDS).
        schedule: the view-weight schedule, 'threestudio' (default) or 'dreamfusion'.
        min_step: the lower end of t ~ U[min_step, max_step] * T (default 0.02).
        max_step: the upper end (default 0.98).
        resolution: side of the square the renders are resized to before encoding (default: the UNet's
            ``sample_size`` times the VAE's downsampling factor, e.g. 512 for SD 1.5).
        unet_batch_size: at most this many samples per UNet call (default: all (2 + K) * B in one call).
        prediction_type: what the UNet predicts, 'epsilon', 'v_prediction' (SD 2.x 768-v) or 'sample' (default:
            the scheduler's ``config.prediction_type``); every output is converted to eps before the guidance.
    """

    def __init__(
        self, unet: nn.Module, vae: nn.Module, scheduler, view_embeds: dict[str, Tensor],
        guidance_scale: float = 100.0, schedule: str = "threestudio", min_step: float = 0.02, max_step: float = 0.98,
        resolution: int | None = None, unet_batch_size: int | None = None, prediction_type: str | None = None,
    ) -> None:
        super().__init__()
        self.prediction_type = prediction_type or getattr(scheduler.config, "prediction_type", None) or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type '{self.prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
        self.unet, self.vae = unet, vae
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.requires_grad_(False)
        self.guidance_scale, self.schedule, self.unet_batch_size = guidance_scale, schedule, unet_batch_size
        self.view_embeds = {k: v.detach() for k, v in view_embeds.items()}
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.min_t = int(self.num_train_timesteps * min_step)
        self.max_t = int(self.num_train_timesteps * max_step)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution or int(unet.config.sample_size) * vae_scale
        self.last: dict[str, Tensor] = {}

    @classmethod
    def from_pipeline(cls, pipe, prompt: str, uncond: str = "", **kw) -> PerpNegSDS:
        """Build from a diffusers SD pipeline: encodes '<prompt>, front/side/back/overhead view' and ``uncond``."""
        return cls(pipe.unet, pipe.vae, pipe.scheduler, encode_view_prompts(pipe, prompt, uncond), **kw)

    def encode(self, rgb: Tensor) -> Tensor:
        """RGB [B, 3, H, W] in [0, 1] -> VAE latents (scaled), differentiable."""
        x = F.interpolate(rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((x * 2 - 1).to(dtype)).latent_dist
        return posterior.sample() * self.scaling_factor

    def forward(self, rgb: Tensor, elevation: Tensor, azimuth: Tensor, t: Tensor | None = None) -> Tensor:
        """SDS loss (scalar) whose gradient w.r.t. the latents is w(t) * (eps_hat - eps) per sample.

        Args:
            rgb: [B, 3, H, W] renders in [0, 1] (differentiable).
            elevation: [B] camera elevations in degrees.
            azimuth: [B] camera azimuths in degrees (0 = front).
            t: [B] diffusion timesteps (default: drawn from U[min_step, max_step] * T).
        """
        latents = self.encode(rgb)
        b = latents.shape[0]
        device = latents.device
        if t is None:
            t = torch.randint(self.min_t, self.max_t + 1, (b,), device=device)  # t ~ U[0.02, 0.98] * T
        emb = {k: v.to(device) for k, v in self.view_embeds.items()}
        pos, negs, neg_w = view_conditioned_embeddings(emb, elevation, azimuth, self.schedule)
        uncond = emb["uncond"].expand(b, *pos.shape[1:])
        with torch.no_grad():
            noise = torch.randn_like(latents)
            a_bar = self.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
            z_t = a_bar.sqrt() * latents + (1 - a_bar).sqrt() * noise  # forward diffusion q(z_t | z)
            k = negs.shape[0]
            udtype = next(self.unet.parameters()).dtype
            x_in = torch.cat([z_t] * (2 + k)).to(udtype)
            cond = torch.cat([uncond, pos, *negs]).to(udtype)
            t_in = t.repeat(2 + k)
            step = x_in.shape[0] if not self.unet_batch_size else self.unet_batch_size
            eps_all = torch.cat(
                [self.unet(x_in[s : s + step], t_in[s : s + step], encoder_hidden_states=cond[s : s + step]).sample
                 for s in range(0, x_in.shape[0], step)]
            ).float().view(2 + k, b, *latents.shape[1:])
            eps_all = to_epsilon(eps_all, z_t.float().unsqueeze(0), a_bar.unsqueeze(0), self.prediction_type)
            eps_hat = perp_neg_guidance(eps_all[0], eps_all[1], eps_all[2:], neg_w.to(device), self.guidance_scale)
            w = 1 - a_bar  # w(t) = 1 - alpha_bar_t
            grad = torch.nan_to_num(w * (eps_hat - noise))  # SDS gradient
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / b  # d loss / d z = grad / B
        self.last = {"t": t.detach(), "grad_norm": grad.flatten(1).norm(dim=1).detach()}
        return loss
