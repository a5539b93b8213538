"""PerpNegStableDiffusion3Pipeline: diffusers' StableDiffusion3Pipeline with Perp-Neg negative prompts.

SD3 is a rectified-flow MMDiT: the transformer predicts the velocity v = eps - x0. One batched transformer call per
denoising step over [uncond, pos, neg_1..K] (token and pooled embeddings stacked alike; optionally chunked with
``transformer_batch_size``); Perp-Neg acts on v per sample, which equals Perp-Neg on eps (see the guidance line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from .flow import chunked_forward, encode_negatives, negative_weights_matrix, per_image
from .guidance import perp_neg_guidance
from .pipeline import prompt_group, resolve_uncond


class PerpNegStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose ``__call__`` adds ``negative_prompts`` / ``negative_weights`` (Perp-Neg, scale
    ``guidance_scale``) and ``guidance_rescale``; ``negative_prompt`` stays the unconditional text, as in diffusers."""

    def _encode_negatives(self, prompts: list, embeds: Sequence[torch.Tensor] | None,
                          pooled: Sequence[torch.Tensor] | None, batch_size: int, nipp: int, device: torch.device,
                          max_sequence_length: int, lora_scale: float | None) -> tuple[list, list]:
        """The K negatives (:func:`encode_negatives`); a negative goes to all three text encoders."""

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            e, _, pe, _ = self.encode_prompt(
                prompt=batch, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=nipp,
                do_classifier_free_guidance=False, clip_skip=self.clip_skip, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
            return e, pe

        return encode_negatives(encode, prompts, embeds, pooled, batch_size, nipp, device)

    # Adapted from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.__call__
    # (same steps and names; the transformer batch, the guidance line, guidance_rescale and the callback differ)
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        guidance_rescale: float = 0.0,
        negative_prompts: Sequence[str | list[str]] | str | None = None,
        negative_weights: Sequence[float] | torch.Tensor | None = None,
        negative_prompts_embeds: Sequence[torch.Tensor] | None = None,
        negative_pooled_prompts_embeds: Sequence[torch.Tensor] | None = None,
        uncond_prompt: str | list[str] | None = None,
        transformer_batch_size: int | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Generate images; see StableDiffusion3Pipeline.__call__ for the arguments shared with diffusers.

        Without negatives this is diffusers' SD3 (plus ``guidance_rescale``). The Perp-Neg scale is ``guidance_scale``.

        Args:
            negative_prompts: K prompts removed with Perp-Neg, each a str (shared by the batch) or a list of one
                per batch prompt; a single str is one prompt. ``negative_prompt`` (singular) keeps diffusers'
                meaning, the unconditional text, and may not be given together with ``negative_prompts`` (a
                ValueError says why); ``uncond_prompt`` sets the unconditional text with Perp-Neg negatives.
                ``negative_prompt_2`` / ``_3`` stay the unconditional text of the 2nd / 3rd encoder.
            negative_weights: w_k >= 0, [K] or [K, batch] (default 1.0 each).
            negative_prompts_embeds: the K negatives as pre-computed token embeddings, [batch or 1, L, D] each
                (instead of ``negative_prompts``; L and D as ``prompt_embeds``).
            negative_pooled_prompts_embeds: their pooled embeddings, [batch or 1, P] each (needed with the above).
            uncond_prompt: the unconditional text (diffusers' ``negative_prompt``) when Perp-Neg negatives are given.
            transformer_batch_size: at most this many samples per transformer call (default: all (2 + K) * n in one).
            guidance_rescale: diffusers' ``rescale_noise_cfg`` of the guided velocity against the prompt's (0: off).
        """
        for name, value in (("ip_adapter_image", ip_adapter_image), ("ip_adapter_image_embeds", ip_adapter_image_embeds)):
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

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
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
        # Perp-Neg needs the unconditional branch even where guidance_scale <= 1 (s is then guidance_scale as given)
        use_guidance = self.do_classifier_free_guidance or k > 0

        # 3. prompts -> embeddings: uncond, pos, neg_1..K ([n, L, D] tokens and [n, P] pooled each)
        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=use_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=self.clip_skip,
            num_images_per_prompt=nipp, max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )
        prompt_embeds = per_image(prompt_embeds, batch_size, nipp, "prompt_embeds")
        pooled_prompt_embeds = per_image(pooled_prompt_embeds, batch_size, nipp, "pooled_prompt_embeds")
        negs, negs_pooled = self._encode_negatives(
            negative_prompts, negative_prompts_embeds, negative_pooled_prompts_embeds, batch_size, nipp, device,
            max_sequence_length, lora_scale,
        )
        w_neg = negative_weights_matrix(negative_weights, k, batch_size, nipp, device)  # [K, n]
        if use_guidance:
            negative_prompt_embeds = per_image(negative_prompt_embeds, batch_size, nipp, "negative_prompt_embeds")
            negative_pooled_prompt_embeds = per_image(negative_pooled_prompt_embeds, batch_size, nipp,
                                                      "negative_pooled_prompt_embeds")
            if skip_guidance_layers is not None:
                original_prompt_embeds = prompt_embeds
                original_pooled_prompt_embeds = pooled_prompt_embeds
            dtype = prompt_embeds.dtype
            groups = [negative_prompt_embeds, prompt_embeds, *negs]
            if len({g.shape[1:] for g in groups}) > 1:
                raise ValueError(f"the prompt, unconditional and negative embeddings must have the same [L, D] to be "
                                 f"batched; got {[tuple(g.shape[1:]) for g in groups]}")
            # the transformer batch: [uncond, pos, neg_1..K], n samples each
            prompt_embeds = torch.cat([g.to(dtype) for g in groups])
            pooled_prompt_embeds = torch.cat(
                [g.to(dtype) for g in (negative_pooled_prompt_embeds, pooled_prompt_embeds, *negs_pooled)])
        n_groups = prompt_embeds.shape[0] // n

        # 4. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels
        latents = self.prepare_latents(
            n, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents,
        )

        # 5. Prepare timesteps
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, h, w = latents.shape
            image_seq_len = (h // self.transformer.config.patch_size) * (w // self.transformer.config.patch_size)
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
            scheduler_kwargs["mu"] = mu
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        # 7. Denoising loop: one batched transformer call per step
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * n_groups) if n_groups > 1 else latents
                timestep = t.expand(latent_model_input.shape[0])
                noise_pred = chunked_forward(
                    self.transformer,
                    {"hidden_states": latent_model_input, "timestep": timestep,
                     "encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds},
                    transformer_batch_size, joint_attention_kwargs=self.joint_attention_kwargs,
                )

                # perform guidance
                if use_guidance:
                    v = noise_pred.view(n_groups, n, *noise_pred.shape[1:])
                    noise_pred_uncond, noise_pred_text, noise_pred_negs = v[0], v[1], v[2:]
                    # Perp-Neg on the velocity v = eps - x0 equals Perp-Neg on eps: with x_t = (1 - t) x0 + t eps and
                    # x_t fixed, eps_hat = x_t + (1 - t) v_hat, so every difference of eps estimates is (1 - t) times
                    # the same difference of v estimates (one positive scalar per step); perp(a, b) is linear and
                    # unchanged when a and b are scaled alike, so the v-space result maps back to the eps-space one.
                    # v = v_u + s * ((v_pos - v_u) - sum_k w_k perp(v_k - v_u, v_pos - v_u))
                    noise_pred = perp_neg_guidance(noise_pred_uncond, noise_pred_text, noise_pred_negs, w_neg,
                                                   self.guidance_scale)
                    should_skip_layers = (
                        i > num_inference_steps * skip_layer_guidance_start
                        and i < num_inference_steps * skip_layer_guidance_stop
                    )
                    if skip_guidance_layers is not None and should_skip_layers:
                        noise_pred_skip_layers = self.transformer(
                            hidden_states=latents, timestep=t.expand(latents.shape[0]),
                            encoder_hidden_states=original_prompt_embeds,
                            pooled_projections=original_pooled_prompt_embeds,
                            joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
                            skip_layers=skip_guidance_layers,
                        )[0]
                        noise_pred = (
                            noise_pred + (noise_pred_text - noise_pred_skip_layers) * self._skip_layer_guidance_scale
                        )
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)

                # compute the previous noisy sample x_t -> x_t-1
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    # prompt_embeds / pooled_prompt_embeds are the stacked transformer batch [uncond, pos, neg_1..K]
                    # (diffusers' [uncond, pos] without negatives); replacements must keep that layout, except that
                    # without negatives a callback may cut CFG off by keeping [pos] only, as in diffusers
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "pooled_prompt_embeds": pooled_prompt_embeds}
                    callback_kwargs = {key: available[key] for key in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                    sizes = (prompt_embeds.shape[0], pooled_prompt_embeds.shape[0])
                    if use_guidance and k == 0 and sizes == (n, n):
                        # diffusers' SD3CFGCutoffCallback kept the prompt's half: no guidance from the next step on
                        use_guidance, n_groups = False, 1
                    elif sizes != (n_groups * n, n_groups * n):
                        raise ValueError(
                            f"callback_on_step_end changed the batch of prompt_embeds / pooled_prompt_embeds to "
                            f"{prompt_embeds.shape[0]} / {pooled_prompt_embeds.shape[0]}; {type(self).__name__} "
                            f"keeps the layout [uncond, pos, neg_1..K] x {n} = {n_groups * n} (with Perp-Neg negatives, "
                            "callbacks that drop the unconditional half, such as SD3CFGCutoffCallback, are not "
                            "supported)")

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
