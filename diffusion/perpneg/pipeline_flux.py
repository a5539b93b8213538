"""PerpNegFluxPipeline: diffusers' FluxPipeline with Perp-Neg negative prompts.

Flux is a rectified-flow transformer predicting the velocity v = eps - x0. Perp-Neg needs real classifier-free
guidance: one batched transformer call per step over [uncond, pos, neg_1..K] (optionally chunked with
``transformer_batch_size``), Perp-Neg on v per sample with scale s = ``true_cfg_scale`` (diffusers' real-CFG strength).

- Guidance-distilled Flux.1-dev (``guidance_embeds=True``) has no trained unconditional branch: Perp-Neg runs "true
  CFG" passes anyway (uncond = ``uncond_prompt`` / ``negative_prompt``, "" by default), K + 2 transformer passes a
  step instead of 1 (a warning says so once per call); the distilled ``guidance`` embedding keeps ``guidance_scale``.
- Non-distilled Flux bases (``guidance_embeds=False``) are ordinary CFG models: K + 2 passes instead of 2.
- Flux.1-schnell is timestep-distilled, with no CFG at all: Perp-Neg negatives are refused with a ValueError. It is
  recognised by "schnell" in the transformer's or pipeline's ``_name_or_path``, or by its configuration signature
  (no guidance embedding and a scheduler without dynamic shifting). ``assume_cfg_trained=True`` bypasses the check for
  a checkpoint that was (re)trained with real CFG but looks like schnell (e.g. a de-distilled schnell fine-tune).
  Without negatives the call is diffusers' FluxPipeline, schnell included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import get_module_execution_device

from .flow import chunked_forward, encode_negatives, negative_weights_matrix, per_image
from .guidance import perp_neg_guidance
from .pipeline import as_batch, prompt_group, resolve_uncond

logger = logging.getLogger("negvision.perpneg")


def is_timestep_distilled(pipe: FluxPipeline) -> bool:
    """Whether ``pipe`` looks like Flux.1-schnell: "schnell" in its name, or no guidance embedding together with a
    scheduler without dynamic shifting (schnell's configuration; dev and the CFG bases shift with resolution)."""
    names = [pipe.transformer.config.get("_name_or_path", ""), pipe.config.get("_name_or_path", "")]
    if any("schnell" in str(name).lower() for name in names):
        return True
    return not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.get("use_dynamic_shifting", False)


class PerpNegFluxPipeline(FluxPipeline):
    """FluxPipeline whose ``__call__`` adds ``negative_prompts`` / ``negative_weights`` (Perp-Neg, scale
    ``true_cfg_scale``) and ``guidance_rescale``; ``negative_prompt`` stays the unconditional text, as in diffusers."""

    def _encode_negatives(self, prompts: list, embeds: Sequence[torch.Tensor] | None,
                          pooled: Sequence[torch.Tensor] | None, batch_size: int, nipp: int, device: torch.device,
                          max_sequence_length: int, lora_scale: float | None) -> tuple[list, list]:
        """The K negatives (:func:`encode_negatives`) as T5 token and pooled CLIP embeddings; a negative goes to both
        text encoders."""

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            e, pe, _ = self.encode_prompt(prompt=batch, prompt_2=None, device=device, num_images_per_prompt=nipp,
                                          max_sequence_length=max_sequence_length, lora_scale=lora_scale)
            return e, pe

        return encode_negatives(encode, prompts, embeds, pooled, batch_size, nipp, device)

    # Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__ (same steps and names; the
    # transformer batch, the guidance line, guidance_rescale and the callback differ)
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 512,
        guidance_rescale: float = 0.0,
        negative_prompts: Sequence[str | list[str]] | str | None = None,
        negative_weights: Sequence[float] | torch.Tensor | None = None,
        negative_prompts_embeds: Sequence[torch.Tensor] | None = None,
        negative_pooled_prompts_embeds: Sequence[torch.Tensor] | None = None,
        uncond_prompt: str | list[str] | None = None,
        transformer_batch_size: int | None = None,
        assume_cfg_trained: bool = False,
    ) -> FluxPipelineOutput | tuple:
        """Generate images; see FluxPipeline.__call__ for the arguments shared with diffusers.

        Without negatives this is diffusers' Flux (real CFG when ``true_cfg_scale > 1`` and ``negative_prompt`` is
        given, in one batched call). With negatives the Perp-Neg scale s is ``true_cfg_scale`` (used as given, also
        when <= 1: s = 1 removes the negatives without amplifying the prompt).

        Args:
            negative_prompts: K prompts removed with Perp-Neg, each a str (shared by the batch) or a list of one
                per batch prompt; a single str is one prompt. ``negative_prompt`` (singular) keeps diffusers'
                meaning, the unconditional text, and may not be given together with ``negative_prompts`` (a
                ValueError says why); ``uncond_prompt`` sets the unconditional text with Perp-Neg negatives.
            negative_weights: w_k >= 0, [K] or [K, batch] (default 1.0 each).
            negative_prompts_embeds: the K negatives as pre-computed T5 embeddings, [batch or 1, L, D] each (instead
                of ``negative_prompts``; L and D as ``prompt_embeds``).
            negative_pooled_prompts_embeds: their pooled CLIP embeddings, [batch or 1, P] each (needed with the above).
            uncond_prompt: the unconditional text (diffusers' ``negative_prompt``) when Perp-Neg negatives are given.
            transformer_batch_size: at most this many samples per transformer call (default: all (2 + K) * n in one).
            guidance_rescale: diffusers' ``rescale_noise_cfg`` of the guided velocity against the prompt's (0: off).
            assume_cfg_trained: skip the Flux.1-schnell check (see the module docstring).
        """
        for name, value in (("ip_adapter_image", ip_adapter_image), ("ip_adapter_image_embeds", ip_adapter_image_embeds),
                            ("negative_ip_adapter_image", negative_ip_adapter_image),
                            ("negative_ip_adapter_image_embeds", negative_ip_adapter_image_embeds)):
            if value is not None:
                raise NotImplementedError(f"{type(self).__name__}: {name} (IP-Adapter) is not supported")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        negative_prompts = prompt_group(negative_prompts)
        if negative_prompts and negative_prompts_embeds is not None:
            raise ValueError("give negative_prompts or negative_prompts_embeds, not both")
        k = len(negative_prompts) if negative_prompts_embeds is None else len(negative_prompts_embeds)
        negative_prompt = resolve_uncond(negative_prompt, negative_prompts or list(negative_prompts_embeds or []),
                                         uncond_prompt, type(self).__name__)
        if k > 0:
            if not assume_cfg_trained and is_timestep_distilled(self):
                raise ValueError(
                    f"{type(self).__name__}: this transformer looks like FLUX.1-schnell (\"schnell\" in its name, or no "
                    "guidance embedding with a scheduler without dynamic shifting). Schnell is timestep-distilled and "
                    "was never trained for classifier-free guidance, so Perp-Neg negative prompts cannot work on it: "
                    "use FLUX.1-dev or a non-distilled Flux base. If this checkpoint was in fact (re)trained with real "
                    "CFG, pass assume_cfg_trained=True.")
            if self.transformer.config.guidance_embeds:
                logger.warning(
                    "Perp-Neg on a guidance-distilled Flux transformer (guidance_embeds=True): it has no real "
                    "unconditional branch, so each step runs true-CFG passes, K + 2 = %d transformer passes (uncond, "
                    "prompt, %d negative(s)) instead of 1; true_cfg_scale=%s is the Perp-Neg scale and the distilled "
                    "guidance embedding keeps guidance_scale=%s.", k + 2, k, true_cfg_scale, guidance_scale)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt, prompt_2, height, width, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        nipp = num_images_per_prompt or 1
        n = batch_size * nipp
        device = self._execution_device

        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        use_guidance = do_true_cfg or k > 0  # Perp-Neg always needs the unconditional branch
        if use_guidance and not has_neg_prompt:
            negative_prompt = ""  # the unconditional text of classifier-free guidance
        (prompt_embeds, pooled_prompt_embeds, text_ids) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=nipp, max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )
        prompt_embeds = per_image(prompt_embeds, batch_size, nipp, "prompt_embeds")
        pooled_prompt_embeds = per_image(pooled_prompt_embeds, batch_size, nipp, "pooled_prompt_embeds")
        negative_prompt_embeds_all = negative_pooled_all = None
        if use_guidance:
            (negative_prompt_embeds, negative_pooled_prompt_embeds, _) = self.encode_prompt(
                prompt=None if negative_prompt is None else as_batch(negative_prompt, batch_size, "negative_prompt"),
                prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, num_images_per_prompt=nipp,
                max_sequence_length=max_sequence_length, lora_scale=lora_scale,
            )
            negative_prompt_embeds = per_image(negative_prompt_embeds, batch_size, nipp, "negative_prompt_embeds")
            negative_pooled_prompt_embeds = per_image(negative_pooled_prompt_embeds, batch_size, nipp,
                                                      "negative_pooled_prompt_embeds")
            negs, negs_pooled = self._encode_negatives(
                negative_prompts, negative_prompts_embeds, negative_pooled_prompts_embeds, batch_size, nipp, device,
                max_sequence_length, lora_scale,
            )
            groups = [negative_prompt_embeds, prompt_embeds, *negs]
            if len({g.shape[1:] for g in groups}) > 1:
                raise ValueError(f"the prompt, unconditional and negative embeddings must have the same [L, D] to be "
                                 f"batched in one transformer call; got {[tuple(g.shape[1:]) for g in groups]}")
            negative_prompt_embeds_all = [negative_prompt_embeds, *negs]  # the other groups, around the prompt's
            negative_pooled_all = [negative_pooled_prompt_embeds, *negs_pooled]
        w_neg = negative_weights_matrix(negative_weights, k, batch_size, nipp, device)  # [K, n]

        def stacked(pos: torch.Tensor, others: list[torch.Tensor] | None) -> torch.Tensor:
            """The transformer batch [uncond, pos, neg_1..K] (n samples each), or [pos] without guidance."""
            return pos if others is None else torch.cat([others[0], pos, *others[1:]]).to(pos.dtype)

        embeds, pooled = stacked(prompt_embeds, negative_prompt_embeds_all), stacked(pooled_prompt_embeds, negative_pooled_all)
        n_groups = embeds.shape[0] // n

        # 4. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            n, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents,
        )

        # 5. Prepare timesteps
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
            sigmas = None
        image_seq_len = latents.shape[1]
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas,
                                                            mu=mu)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        # handle guidance (the distilled guidance embedding, the same for every group)
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            guidance = guidance.expand(n_groups * n)
        else:
            guidance = None
        if self.joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}

        # 6. Denoising loop: one batched transformer call per step (each chunk in its own cache context)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = torch.cat([latents] * n_groups) if n_groups > 1 else latents
                timestep = t.expand(latent_model_input.shape[0]).to(latents.dtype)
                noise_pred = chunked_forward(
                    self.transformer,
                    {"hidden_states": latent_model_input, "timestep": timestep / 1000, "guidance": guidance,
                     "pooled_projections": pooled, "encoder_hidden_states": embeds},
                    transformer_batch_size, context=lambda j: self.transformer.cache_context(f"perpneg_{j}"),
                    txt_ids=text_ids, img_ids=latent_image_ids, joint_attention_kwargs=self.joint_attention_kwargs,
                )

                if use_guidance:
                    v = noise_pred.view(n_groups, n, *noise_pred.shape[1:])
                    neg_noise_pred, noise_pred_text, noise_pred_negs = v[0], v[1], v[2:]
                    # Perp-Neg on the velocity v = eps - x0 equals Perp-Neg on eps: with x_t = (1 - t) x0 + t eps and
                    # x_t fixed, eps_hat = x_t + (1 - t) v_hat, so every difference of eps estimates is (1 - t) times
                    # the same difference of v estimates (one positive scalar per step); perp(a, b) is linear and
                    # unchanged when a and b are scaled alike, so the v-space result maps back to the eps-space one.
                    # v = v_u + s * ((v_pos - v_u) - sum_k w_k perp(v_k - v_u, v_pos - v_u)),  s = true_cfg_scale
                    noise_pred = perp_neg_guidance(neg_noise_pred, noise_pred_text, noise_pred_negs, w_neg,
                                                   true_cfg_scale)
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)

                # compute the previous noisy sample x_t -> x_t-1
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    # prompt_embeds is the prompt's own embeddings [n, L, D], as in diffusers
                    available = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {key: available[key] for key in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    if "prompt_embeds" in callback_outputs:
                        prompt_embeds = callback_outputs.pop("prompt_embeds")
                        embeds = stacked(prompt_embeds, negative_prompt_embeds_all)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        self._current_timestep = None
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)
