"""PerpNegStableDiffusionXLPipeline: diffusers' StableDiffusionXLPipeline with Perp-Neg negative (and extra positive)
prompts.

diffusers' SDXL loop calls the UNet once per step on [uncond, pos] and then forms classifier-free guidance
eps_u + s * (eps_pos - eps_u). For the duration of a call this pipeline routes the UNet through
:func:`perp_neg_unet_forward`, which appends the K extra prompts to the same batch (one UNet call per step, with
their own pooled text embeddings and the positive half's time ids) and returns [eps_u, eps_pos'] with

    eps_pos' = eps_u + (e_pos + sum_k w_k * perp(e_k, e_pos)),   e_i = eps_i - eps_u,

so that diffusers' own CFG line produces exactly the Perp-Neg estimate eps_u + s * (e_pos + sum_k w_k perp(...))
(w_k < 0 for negatives). The rest of SDXL (refiner-style ``denoising_end``, micro-conditioning, schedulers,
callbacks) is diffusers' code, unchanged. ``guidance_rescale`` then rescales against eps_pos' (the composed
conditional estimate), not the plain eps_pos as :class:`PerpNegStableDiffusionPipeline` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from .guidance import perp_composition
from .pipeline import PerpNegStableDiffusionPipeline, as_batch, prompt_group, resolve_uncond


def perp_neg_unet_forward(
    forward: Callable,
    n: int,
    embeds: Sequence[torch.Tensor],
    pooled: Sequence[torch.Tensor],
    weights: torch.Tensor,
    unet_batch_size: int | None = None,
) -> Callable:
    """Wrap an SDXL UNet ``forward`` called on [uncond (n), pos (n)]: see the module docstring.

    embeds / pooled: the K extra prompts' token and pooled embeddings ([n, L, D] and [n, P] each); weights: signed
    [K, n] (> 0 adds the perpendicular part of a positive prompt, < 0 removes that of a negative one).
    """
    k = len(embeds)

    def wrapped(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kw):
        if sample.shape[0] != 2 * n:
            raise RuntimeError(f"Perp-Neg SDXL: the UNet got a batch of {sample.shape[0]}, expected [uncond, pos] "
                               f"= {2 * n} (classifier-free guidance must be on)")
        if args:
            raise TypeError("Perp-Neg SDXL: the UNet must be called with keyword arguments after encoder_hidden_states")
        added = dict(added_cond_kwargs or {})
        if set(added) - {"text_embeds", "time_ids"}:
            raise NotImplementedError(f"Perp-Neg SDXL: added_cond_kwargs {sorted(set(added) - {'text_embeds', 'time_ids'})} "
                                      "(IP-Adapter) are not supported")

        def extend(x: torch.Tensor, extra: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
            # [uncond, pos] + K copies of the pos half (or the extra prompts' own tensors)
            more = [e.to(device=x.device, dtype=x.dtype) for e in extra] if extra is not None else [x[n:]] * k
            return torch.cat([x, *more])

        x = extend(sample)
        ehs = extend(encoder_hidden_states, embeds)
        added = {"text_embeds": extend(added["text_embeds"], pooled), "time_ids": extend(added["time_ids"])}
        t = timestep
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == 2 * n:
            t = extend(t)
        if kw.get("timestep_cond") is not None:
            kw["timestep_cond"] = extend(kw["timestep_cond"])
        total = x.shape[0]
        step = total if not unet_batch_size or unet_batch_size >= total else int(unet_batch_size)
        outs = []
        for s in range(0, total, step):
            sl = slice(s, s + step)
            ts = t[sl] if isinstance(t, torch.Tensor) and t.ndim == 1 else t
            kws = {key: (v[sl] if key == "timestep_cond" and v is not None else v) for key, v in kw.items()}
            outs.append(forward(x[sl], ts, ehs[sl], added_cond_kwargs={a: v[sl] for a, v in added.items()},
                                return_dict=False, **kws)[0])
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        eps_u, eps_pos, others = out[:n], out[n : 2 * n], out[2 * n :].view(k, n, *out.shape[1:])
        # guidance scale 1: eps_u + e_pos + sum_k w_k perp(e_k, e_pos)  (diffusers applies s afterwards)
        eps_pos_new = perp_composition(eps_u, eps_pos, others, weights, 1.0)
        res = torch.cat([eps_u, eps_pos_new])
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=res)
        return (res,)

    return wrapped


class PerpNegStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose ``__call__`` adds ``negative_prompts`` / ``negative_weights`` (Perp-Neg) and
    ``positive_prompts`` / ``positive_weights``; ``negative_prompt`` stays diffusers' unconditional text."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        negative_prompts: Sequence[str | list[str]] | None = None,
        negative_weights: Sequence[float] | torch.Tensor | None = None,
        positive_prompts: Sequence[str | list[str]] | None = None,
        positive_weights: Sequence[float] | torch.Tensor | None = None,
        unet_batch_size: int | None = None,
        uncond_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ):
        """Generate images; see StableDiffusionXLPipeline.__call__ for the (keyword) arguments shared with diffusers.

        Without extra prompts this is diffusers' call unchanged.

        Args:
            negative_prompts: K prompts removed with Perp-Neg, each a str (shared by the batch) or a list of one
                per batch prompt; a single str is one prompt. ``negative_prompt`` (singular) keeps diffusers'
                meaning, the unconditional text, and may not be given together with ``negative_prompts``;
                ``uncond_prompt`` sets the unconditional text with Perp-Neg negatives.
            negative_weights: w_k >= 0, [K] or [K, batch] (default 1.0 each).
            positive_prompts: P extra prompts whose perpendicular part (to the main prompt's) is added; str or list.
            positive_weights: [P] or [P, batch] (default 1.0 each).
            unet_batch_size: at most this many samples per UNet call (default: all (2 + P + K) * n in one call).
            uncond_prompt: the unconditional text (diffusers' negative_prompt) when Perp-Neg negatives are given.
        """
        pos_extra, negs = prompt_group(positive_prompts), prompt_group(negative_prompts)
        uncond = resolve_uncond(kwargs.pop("negative_prompt", None), negs, uncond_prompt, type(self).__name__)
        if uncond is not None:
            kwargs["negative_prompt"] = uncond
        if not pos_extra and not negs:
            return super().__call__(prompt, **kwargs)
        if kwargs.get("guidance_scale", 5.0) <= 1.0:
            raise ValueError("Perp-Neg needs classifier-free guidance: guidance_scale must be > 1")
        if kwargs.get("ip_adapter_image") is not None or kwargs.get("ip_adapter_image_embeds") is not None:
            raise NotImplementedError("PerpNegStableDiffusionXLPipeline: IP-Adapter inputs are not supported")
        if prompt is None:
            if kwargs.get("prompt_embeds") is None:
                raise ValueError("give prompt or prompt_embeds")
            batch_size = kwargs["prompt_embeds"].shape[0]
        else:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        nipp = kwargs.get("num_images_per_prompt") or 1
        n = batch_size * nipp
        device = self._execution_device
        embeds, pooled = [], []
        for p, what in [(p, "positive_prompts") for p in pos_extra] + [(p, "negative_prompts") for p in negs]:
            e, _, pe, _ = self.encode_prompt(
                prompt=as_batch(p, batch_size, what), device=device, num_images_per_prompt=nipp,
                do_classifier_free_guidance=False, clip_skip=kwargs.get("clip_skip"),
            )
            embeds.append(e)
            pooled.append(pe)
        expand = PerpNegStableDiffusionPipeline._expand_weights
        w_pos = expand(positive_weights, len(pos_extra), batch_size, nipp, 1.0, device)
        w_neg = expand(negative_weights, len(negs), batch_size, nipp, 1.0, device)
        if (w_neg < 0).any():
            raise ValueError("negative_weights must be >= 0 (they are subtracted)")
        weights = torch.cat([w_pos, -w_neg])

        unet = self.unet
        had_own = "forward" in unet.__dict__
        original = unet.forward
        unet.forward = perp_neg_unet_forward(original, n, embeds, pooled, weights, unet_batch_size)
        try:
            return super().__call__(prompt, **kwargs)
        finally:
            if had_own:
                unet.forward = original
            else:
                del unet.forward
