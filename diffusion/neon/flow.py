"""Neon self-training of rectified-flow transformers (SD3's MMDiT, Flux): the training data and the loss.

As diffusers' ``train_dreambooth_sd3.py`` / ``train_dreambooth_flux.py`` train these models:

- latents z_0 = (E(x) - shift_factor) * scaling_factor (the VAE posterior sampled once per image);
- each distinct prompt encoded once with the pipeline's own ``encode_prompt`` (SD3: token + pooled embeddings of the
  CLIP pair and T5, or T5's zeros without it; Flux: T5 tokens + pooled CLIP, and ``text_ids``);
- sigma: u ~ logit-normal(0, 1) (``compute_density_for_timestep_sampling``; "mode" or "uniform" on request), then
  sigma = the training scheduler's sigma at index floor(u * N) and t = sigma * N (N = num_train_timesteps, 1000), so
  SD3's static shift applies as in its script and Flux's dynamic-shifting table gives sigma = 1 - floor(u N) / N;
- x_t = (1 - sigma) z_0 + sigma eps and the target v = eps - z_0, unweighted MSE (the scripts' weight for
  logit-normal sampling is 1);
- the transformer called as each pipeline's ``__call__`` calls it: SD3 with ``timestep`` = t in [0, 1000], Flux with
  t / 1000 = sigma, its latents packed 2x2 (``FluxPipeline._pack_latents``, ``img_ids`` / ``txt_ids``) and, for a
  guidance-distilled transformer (``guidance_embeds``), the ``guidance`` embedding at the sampling guidance scale.

Every random draw (eps, u) comes from torch's global generator on the latents' device, which the engine seeds from
the run's seed and saves in (and restores from) every checkpoint: same seed, same weights; a resumed run replays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FLOW_FAMILIES", "FluxForward", "FlowData", "call_default", "check_flow_pipeline", "encode_flow_prompts",
           "flow_family",
           "flow_latents", "flow_training_setup", "rectified_flow_loss", "sample_sigmas", "sd3_forward",
           "training_sigmas"]

# the denoiser class (or a subclass of it) -> family
FLOW_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# the components each family's encode_prompt and latents need (SD3's T5, text_encoder_3, is optional: zeros without)
_NEEDS = {
    "sd3": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "flux": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")


def flow_family(module: nn.Module) -> str | None:
    """"sd3" or "flux" for a rectified-flow transformer of those families (subclasses too), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in FLOW_FAMILIES:
            return FLOW_FAMILIES[cls.__name__]
    return None


def check_flow_pipeline(pipe: Any, family: str) -> None:
    """NotImplementedError naming the first component the family's self-training needs and the pipeline lacks."""
    for need in _NEEDS[family]:
        if getattr(pipe, need, None) is None:
            raise NotImplementedError(
                f"self-training a {type(pipe.transformer).__name__} needs a pipeline with '{need}' "
                f"({type(pipe).__name__} has none)")


def call_default(fn: Callable, name: str, fallback: Any = None) -> Any:
    """The default of argument ``name`` of ``fn`` (e.g. ``pipe.__call__``: what sampling used when not given)."""
    p = inspect.signature(fn).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty or p.default is None else p.default


@torch.no_grad()
def flow_latents(vae: nn.Module, x: Tensor, batch_size: int = 16) -> Tensor:
    """z_0 = (E(x) - shift_factor) * scaling_factor for images ``x`` [N, 3, H, W] in [-1, 1] (SD3, Flux), on the CPU.
    The posterior is sampled (``latent_dist.sample()``, the global generator), as diffusers' training scripts do."""
    dev = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    out = []
    for i in range(0, len(x), batch_size):
        z = vae.encode(x[i:i + batch_size].to(dev, dtype)).latent_dist.sample()
        # SD3 / Flux latent normalisation: z_0 = (z - shift_factor) * scaling_factor
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_flow_prompts(pipe: Any, family: str, prompts: Sequence[Any], *, device: torch.device | str,
                        max_sequence_length: int, batch_size: int = 16
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Each distinct prompt encoded once with ``pipe.encode_prompt`` (no classifier-free guidance branch).

    Returns:
        prompt_embeds [P, L, D] and pooled_prompt_embeds [P, D] of the P distinct prompts (sorted), the index [N]
        of each sample's prompt, and Flux's ``text_ids`` [L, 3] (None for SD3); all on the CPU.
    """
    if any(p is None for p in prompts):
        raise ValueError("every sample of a text-to-image pipeline needs its prompt")
    uniq = sorted(set(str(p) for p in prompts))
    embeds, pooled, text_ids = [], [], None
    for i in range(0, len(uniq), batch_size):
        chunk = uniq[i:i + batch_size]
        if family == "sd3":
            e, _, pe, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                             num_images_per_prompt=1, do_classifier_free_guidance=False,
                                             max_sequence_length=max_sequence_length)
        else:
            e, pe, text_ids = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device, num_images_per_prompt=1,
                                                 max_sequence_length=max_sequence_length)
            text_ids = text_ids.float().cpu()
        embeds.append(e.float().cpu())
        pooled.append(pe.float().cpu())
    where = {p: i for i, p in enumerate(uniq)}
    idx = torch.tensor([where[str(p)] for p in prompts], dtype=torch.long)
    return torch.cat(embeds), torch.cat(pooled), idx, text_ids


class FlowData(torch.utils.data.Dataset):
    """(z_0 [C, h, w], prompt_embeds [L, D], pooled_prompt_embeds [P]) per sample; the embeddings are stored once per
    distinct prompt."""

    def __init__(self, latents: Tensor, prompt_embeds: Tensor, pooled: Tensor, idx: Tensor):
        self.latents, self.prompt_embeds, self.pooled, self.idx = latents, prompt_embeds, pooled, idx

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        j = self.idx[i]
        return self.latents[i], self.prompt_embeds[j], self.pooled[j]


def training_sigmas(scheduler_config: Any) -> tuple[Tensor, int]:
    """The sigma table [N] of a fresh ``FlowMatchEulerDiscreteScheduler`` built from ``scheduler_config`` (the copy
    diffusers' training scripts index; sigma_0 = 1 ... sigma_{N-1} = 1/N, shifted unless dynamic shifting), and N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    n = int(sched.config.num_train_timesteps)
    return sched.sigmas[:n].to(torch.float32).clone(), n


def sample_sigmas(n: int, sigmas: Tensor, *, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, device: torch.device | str = "cpu") -> Tensor:
    """``n`` noise levels: u from ``compute_density_for_timestep_sampling`` (global generator on ``device``), then
    sigma = ``sigmas[floor(u * len(sigmas))]`` as in diffusers' SD3 / Flux training scripts."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got '{weighting_scheme}'")
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=n, logit_mean=logit_mean,
                                              logit_std=logit_std, mode_scale=mode_scale, device=device)
    index = (u * len(sigmas)).long().clamp_(0, len(sigmas) - 1)
    return sigmas.to(device)[index]


def sd3_forward(model: nn.Module, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
    """v-prediction of an SD3 transformer, called as ``StableDiffusion3Pipeline.__call__`` does (t in [0, 1000])."""
    return model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                 return_dict=False)[0]


class FluxForward:
    """v-prediction of a Flux transformer on latents [B, C, h, w], called as ``FluxPipeline.__call__`` does: latents
    packed 2x2 with their ``img_ids``, ``txt_ids``, timestep t / 1000 and, for a guidance-distilled transformer, the
    ``guidance`` embedding; the prediction unpacked back to [B, C, h, w].

    Args:
        pipeline_class: the pipeline's class (its ``_pack_latents`` / ``_unpack_latents`` /
            ``_prepare_latent_image_ids``).
        text_ids: [L, 3] from ``encode_prompt``.
        guidance: the distilled guidance scale, or None (a transformer without ``guidance_embeds``).
    """

    def __init__(self, pipeline_class: type, text_ids: Tensor, guidance: float | None):
        self.cls, self.text_ids, self.guidance = pipeline_class, text_ids, guidance

    def __call__(self, model: nn.Module, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        b, c, h, w = x_t.shape
        packed = self.cls._pack_latents(x_t, b, c, h, w)
        img_ids = self.cls._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x_t.device, dtype=torch.float32)
        pred = model(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=prompt_embeds, txt_ids=self.text_ids.to(x_t.device, x_t.dtype),
                     img_ids=img_ids, return_dict=False)[0]
        return self.cls._unpack_latents(pred, h, w, 1)  # vae_scale_factor 1: h, w are already latent sizes


def rectified_flow_loss(forward: Callable[..., Tensor], sigmas: Tensor, *, num_train_timesteps: int = 1000,
                        weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                        mode_scale: float = 1.29) -> Callable[[nn.Module, Any], dict[str, Tensor]]:
    """loss_fn(model, batch) of rectified-flow training; batch = (z_0, *conditions), ``forward(model, x_t, t,
    *conditions)`` the velocity prediction. Draws eps, then sigma (``sample_sigmas``), from the global generator."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got '{weighting_scheme}'")

    def loss_fn(model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x0, *cond = batch
        eps = torch.randn_like(x0)
        sigma = sample_sigmas(x0.shape[0], sigmas, weighting_scheme=weighting_scheme, logit_mean=logit_mean,
                              logit_std=logit_std, mode_scale=mode_scale, device=x0.device)
        s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        # rectified flow: x_t = (1 - sigma) x_0 + sigma eps, velocity target v = eps - x_0
        x_t = (1.0 - s) * x0 + s * eps
        target = eps - x0
        t = sigma * num_train_timesteps  # the scheduler's timestep of sigma
        pred = forward(model, x_t, t, *cond)
        return {"loss": nn.functional.mse_loss(pred.float(), target.float())}

    return loss_fn


def flow_training_setup(pipe: Any, family: str, x0: Tensor, prompts: Sequence[Any], *, device: torch.device | str,
                        guidance_scale: float | None = None, max_sequence_length: int | None = None,
                        batch_size: int = 16, weighting_scheme: str = "logit_normal"
                        ) -> tuple[FlowData, Callable[[nn.Module, Any], dict[str, Tensor]], dict[str, Any]]:
    """Data, loss_fn and a summary (for the run's config) to fine-tune ``pipe.transformer`` on images ``x0``
    [N, 3, H, W] in [-1, 1] sampled with ``prompts`` (one per image).

    ``guidance_scale`` / ``max_sequence_length``: what sampling used (None: the pipeline's ``__call__`` defaults);
    a guidance-distilled Flux transformer trains at that guidance (1.0 when the pipeline has no default). On an
    accelerator the VAE and text encoders are moved to the CPU once everything is encoded."""
    msl = int(max_sequence_length or call_default(pipe.__call__, "max_sequence_length",
                                                  call_default(pipe.encode_prompt, "max_sequence_length", 256)))
    latents = flow_latents(pipe.vae, x0, batch_size)
    embeds, pooled, idx, text_ids = encode_flow_prompts(pipe, family, prompts, device=device,
                                                        max_sequence_length=msl, batch_size=batch_size)
    if torch.device(device).type != "cpu":  # encoded: the accelerator's memory is the transformer's to train
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(pipe, name, None), nn.Module):
                getattr(pipe, name).to("cpu")
    sigmas, n = training_sigmas(pipe.scheduler.config)
    info: dict[str, Any] = {"loss": "rectified_flow", "family": family, "sigma_sampling": weighting_scheme,
                            "max_sequence_length": msl}
    if family == "sd3":
        forward: Callable[..., Tensor] = sd3_forward
    else:
        if latents.shape[-2] % 2 or latents.shape[-1] % 2:
            raise ValueError(f"Flux packs latents 2x2: latent size {tuple(latents.shape[-2:])} must be even "
                             "(image size a multiple of 2 * the VAE's scale factor)")
        guidance = None
        if getattr(pipe.transformer.config, "guidance_embeds", False):
            guidance = float(guidance_scale if guidance_scale is not None
                             else call_default(pipe.__call__, "guidance_scale", 1.0))
        info["guidance"] = guidance
        forward = FluxForward(type(pipe), text_ids, guidance)
    loss_fn = rectified_flow_loss(forward, sigmas, num_train_timesteps=n, weighting_scheme=weighting_scheme)
    return FlowData(latents, embeds, pooled, idx), loss_fn, info
