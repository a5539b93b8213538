"""PerpNegStableDiffusionPipeline: diffusers' StableDiffusionPipeline with Perp-Neg negative (and extra positive) prompts.

One batched UNet call per denoising step over [uncond, pos, pos_extra_1..P, neg_1..K] (optionally chunked with
``unet_batch_size``); projection per sample, so any batch size / num_images_per_prompt is correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)

from .guidance import perp_composition


def prompt_group(prompts: str | Sequence[str | list[str]] | None) -> list[str | list[str]]:
    """``negative_prompts`` / ``positive_prompts`` as a list of prompts: a string is ONE prompt (never its letters)."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts)


def resolve_uncond(negative_prompt: Any, negative_prompts: list, uncond_prompt: Any, what: str = "pipeline") -> Any:
    """The unconditional text: ``uncond_prompt``, or diffusers' ``negative_prompt`` when no Perp-Neg negatives are
    given; both ``negative_prompt`` and ``negative_prompts`` at once is a ``ValueError`` explaining the difference."""
    given = any([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt or [])  # a non-empty text
    if given and negative_prompts:
        raise ValueError(
            f"{what}: negative_prompt (singular) and negative_prompts (plural) mean different things: negative_prompt "
            "is diffusers' unconditional text (it replaces the empty prompt of classifier-free guidance, so it is "
            "pushed away from at full strength along every direction); negative_prompts are Perp-Neg negatives, of "
            "which only the component perpendicular to the main prompt is removed. Pass the things to avoid as "
            "negative_prompts; to also set the unconditional text on purpose, pass it as uncond_prompt=...")
    if uncond_prompt is not None:
        if given:
            raise ValueError(f"{what}: give uncond_prompt or negative_prompt, not both (they are the same text)")
        return uncond_prompt
    return negative_prompt


def as_batch(p: str | list[str], batch_size: int, what: str) -> list[str]:
    if isinstance(p, str):
        return [p] * batch_size
    if len(p) != batch_size:
        raise ValueError(f"{what}: got {len(p)} prompts for a batch of {batch_size}")
    return list(p)


class PerpNegStableDiffusionPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose ``__call__`` adds ``negative_prompts`` / ``negative_weights`` (Perp-Neg) and
    ``positive_prompts`` / ``positive_weights`` (perpendicular composition); ``negative_prompt`` stays the
    unconditional text, as in diffusers."""

    def _encode_group(
        self,
        prompts: Sequence[str | list[str]] | None,
        embeds: Sequence[torch.Tensor] | None,
        batch_size: int,
        num_images_per_prompt: int,
        device: torch.device,
        dtype: torch.dtype,
        what: str,
    ) -> list[torch.Tensor]:
        """Encode each prompt (str shared by the batch, or a list of B) to [B * num_images_per_prompt, L, D]."""
        out: list[torch.Tensor] = []
        if embeds is not None:
            for e in embeds:
                if e.shape[0] == batch_size:
                    e = e.repeat_interleave(num_images_per_prompt, dim=0)
                elif e.shape[0] == 1:
                    e = e.expand(batch_size * num_images_per_prompt, *e.shape[1:])
                out.append(e.to(device=device, dtype=dtype))
            return out
        for p in prompt_group(prompts):
            e, _ = self.encode_prompt(
                as_batch(p, batch_size, what), device, num_images_per_prompt, False, clip_skip=self.clip_skip
            )
            out.append(e.to(dtype))
        return out

    @staticmethod
    def _expand_weights(weights: Any, k: int, batch_size: int, nipp: int, default: float, device) -> torch.Tensor:
        """Weights as [K, B * num_images_per_prompt] (given as None, [K] or [K, B])."""
        if weights is None:
            weights = [default] * k
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        if w.ndim == 0:
            w = w.expand(k)
        if w.shape[0] != k:
            raise ValueError(f"got {w.shape[0]} weights for {k} prompts")
        if w.ndim == 1:
            w = w[:, None].expand(k, batch_size)
        if w.shape != (k, batch_size):
            raise ValueError(f"weights must be [K] or [K, batch]=({k}, {batch_size}); got {tuple(w.shape)}")
        return w.repeat_interleave(nipp, dim=1)

    # Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.__call__
    # (same steps and names; the UNet batch, the guidance line and the callback handling differ)
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        negative_prompts: Sequence[str | list[str]] | None = None,
        negative_weights: Sequence[float] | torch.Tensor | None = None,
        negative_prompts_embeds: Sequence[torch.Tensor] | None = None,
        positive_prompts: Sequence[str | list[str]] | None = None,
        positive_weights: Sequence[float] | torch.Tensor | None = None,
        positive_prompts_embeds: Sequence[torch.Tensor] | None = None,
        unet_batch_size: int | None = None,
        uncond_prompt: str | list[str] | None = None,
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images; see StableDiffusionPipeline.__call__ for the arguments shared with diffusers.

        Args:
            negative_prompts: K prompts removed with Perp-Neg, each a str (shared by the batch) or a list of one
                per batch prompt; a single str is one prompt. ``negative_prompt`` (singular) keeps diffusers'
                meaning, the unconditional text, and may not be given together with ``negative_prompts`` (a
                ValueError says why); ``uncond_prompt`` sets the unconditional text with Perp-Neg negatives.
            negative_weights: w_k >= 0, [K] or [K, batch] (default 1.0 each).
            negative_prompts_embeds: the K negative prompts as pre-computed embeddings, [batch or 1, L, D] each
                (instead of ``negative_prompts``).
            positive_prompts: P extra prompts whose perpendicular part (to the main prompt's) is added; str or list.
            positive_weights: [P] or [P, batch] (default 1.0 each).
            positive_prompts_embeds: the P extra prompts as pre-computed embeddings, [batch or 1, L, D] each.
            unet_batch_size: at most this many samples per UNet call (default: all (2 + P + K) * n in one call).
        """
        for bad in ("ip_adapter_image", "ip_adapter_image_embeds"):
            if kwargs.get(bad) is not None:
                raise NotImplementedError(f"PerpNegStableDiffusionPipeline: {bad} is not supported")
        if kwargs.get("callback") is not None:
            raise NotImplementedError("use callback_on_step_end (the old `callback` argument is not supported)")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        negative_prompts = prompt_group(negative_prompts)
        positive_prompts = prompt_group(positive_prompts)
        negative_prompt = resolve_uncond(negative_prompt, negative_prompts or list(negative_prompts_embeds or []),
                                         uncond_prompt, type(self).__name__)

        if not height or not width:
            size = self.unet.config.sample_size
            size = size if isinstance(size, int) else size[0]
            height, width = size * self.vae_scale_factor, size * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            None, None, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        nipp = num_images_per_prompt or 1
        device = self._execution_device
        n = batch_size * nipp

        # 1. prompts -> embeddings: uncond, pos, extra positives, negatives (each [n, L, D])
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, nipp, True, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=self.clip_skip,
        )
        dtype = prompt_embeds.dtype
        pos_extra = self._encode_group(positive_prompts, positive_prompts_embeds, batch_size, nipp, device, dtype, "positive_prompts")
        negs = self._encode_group(negative_prompts, negative_prompts_embeds, batch_size, nipp, device, dtype, "negative_prompts")
        w_pos = self._expand_weights(positive_weights, len(pos_extra), batch_size, nipp, 1.0, device)
        w_neg = self._expand_weights(negative_weights, len(negs), batch_size, nipp, 1.0, device)
        if (w_neg < 0).any():
            raise ValueError("negative_weights must be >= 0 (they are subtracted)")
        weights = torch.cat([w_pos, -w_neg])  # signed weights of the "other" prompts, [P + K, n]
        use_guidance = self.do_classifier_free_guidance or len(pos_extra) + len(negs) > 0

        def all_embeds() -> torch.Tensor:
            groups = [negative_prompt_embeds, prompt_embeds, *pos_extra, *negs] if use_guidance else [prompt_embeds]
            return torch.cat(groups)

        embeds = all_embeds()
        n_groups = embeds.shape[0] // n

        # 2. timesteps and latents
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(
            n, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            gs = torch.tensor(self.guidance_scale - 1).repeat(n * n_groups)
            timestep_cond = self.get_guidance_scale_embedding(gs, embedding_dim=self.unet.config.time_cond_proj_dim).to(
                device=device, dtype=latents.dtype
            )

        # 3. denoising loop: one batched UNet call per step
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * n_groups)
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self._unet_batched(latent_model_input, t, embeds, timestep_cond, unet_batch_size)

                if use_guidance:
                    groups = noise_pred.view(n_groups, n, *noise_pred.shape[1:])
                    noise_uncond, noise_pos, noise_others = groups[0], groups[1], groups[2:]
                    # eps = eps_u + s * ((eps_pos - eps_u) + sum_i w_i perp(eps_i - eps_u, eps_pos - eps_u))
                    noise_pred = perp_composition(noise_uncond, noise_pos, noise_others, weights, self.guidance_scale)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pos, guidance_rescale=self.guidance_rescale)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents, "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    if "prompt_embeds" in callback_outputs or "negative_prompt_embeds" in callback_outputs:
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        embeds = all_embeds()

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 4. decode
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    def _unet_batched(self, x, t, embeds, timestep_cond, unet_batch_size: int | None) -> torch.Tensor:
        """The UNet over the whole stacked batch in one call, or in chunks of ``unet_batch_size`` samples."""
        total = x.shape[0]
        step = total if not unet_batch_size or unet_batch_size >= total else unet_batch_size
        outs = []
        for s in range(0, total, step):
            tc = None if timestep_cond is None else timestep_cond[s : s + step]
            outs.append(
                self.unet(
                    x[s : s + step], t, encoder_hidden_states=embeds[s : s + step], timestep_cond=tc,
                    cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False,
                )[0]
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs)
