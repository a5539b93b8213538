"""Perp-Neg as a diffusers guider (``diffusers.guiders.BaseGuidance``) for diffusers' modular pipelines.

Swap the guider component and add the negative-prompt step::

    from diffusers.modular_pipelines import stable_diffusion_3
    from diffusion.perpneg.guider import PerpNegGuidance, perp_neg_blocks

    blocks = perp_neg_blocks(stable_diffusion_3.StableDiffusion3AutoBlocks())
    pipe = blocks.init_pipeline("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_components(torch_dtype=torch.float16)
    pipe.update_components(guider=PerpNegGuidance(guidance_scale=7.0))
    image = pipe(prompt="a red 7 on stripes", negative_prompts=["red"], negative_weights=[1.0], output="images")

Prediction slots (named by ``__guidance_identifier__``): ``pred_cond`` (the prompt), ``pred_uncond`` (the
unconditional text) and ``pred_neg_0 .. pred_neg_{K-1}``; the denoiser runs the model once per slot, as for every
diffusers guider, and :meth:`PerpNegGuidance.forward` composes
``pred_uncond + s * ((pred_cond - pred_uncond) - sum_k w_k * perp(pred_neg_k - pred_uncond, pred_cond - pred_uncond))``
per sample (:func:`~diffusion.perpneg.guidance.perp_neg_guidance`). The K negatives' model inputs are set on the guider
per call by :class:`PerpNegPromptsStep` (which encodes ``negative_prompts`` with the pipeline's own text encoder
step) or directly with :meth:`PerpNegGuidance.set_negatives` (precomputed embeddings, any pipeline).

Which modular pipelines: SDXL, SD3 (both pass their inputs to the guider as (cond, uncond) pairs) and Flux (its stock
denoiser has no guider; :func:`perp_neg_blocks` swaps in :class:`PerpNegFluxLoopDenoiser`) are tested with tiny
components. Pipelines whose denoiser hands ``(cond, uncond)`` inputs to ``guider.prepare_inputs`` /
``prepare_inputs_from_block_state`` (qwenimage, z_image, wan) take the guider with :meth:`set_negatives` and the field
names of their denoiser (``FIELDS`` lists them), untested here (no tiny components of those models are built offline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg
from diffusers.modular_pipelines import ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam
from torch import Tensor

from .guidance import perp_neg_guidance
from .pipeline import as_batch, prompt_group, resolve_uncond

COND, UNCOND, NEG = "pred_cond", "pred_uncond", "pred_neg_"
SLOTS = "pred_slots"  # every slot stacked along the batch in one model call (batch_slots=True)

# per modular pipeline (the blocks' model_name): guider input name of the denoiser -> the text encoder step's output
FIELDS: dict[str, dict[str, str]] = {
    "stable-diffusion-xl": {"prompt_embeds": "prompt_embeds", "text_embeds": "pooled_prompt_embeds"},
    "stable-diffusion-3": {"encoder_hidden_states": "prompt_embeds", "text_embeds": "pooled_prompt_embeds"},
    "flux": {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"},
    # untested (no offline tiny components): the names their denoisers give the guider
    "qwenimage": {"encoder_hidden_states": "prompt_embeds", "encoder_hidden_states_mask": "prompt_embeds_mask"},
    "z-image": {"cap_feats": "prompt_embeds"},
    "wan": {"encoder_hidden_states": "prompt_embeds"},
}


def _match_batch(value: Tensor, like: Tensor | None, what: str) -> Tensor:
    """``value`` ([1 or b, ...]) repeated per sample to the batch of ``like`` (prompt i's rows stay together, as the
    pipelines' num_images_per_prompt expansion does)."""
    if not isinstance(value, Tensor) or not isinstance(like, Tensor):
        return value
    n, m = like.shape[0], value.shape[0]
    if m != n:
        if m == 0 or n % m:
            raise ValueError(f"PerpNegGuidance: {what} has batch {m}, the prompt's has {n}")
        value = value.repeat_interleave(n // m, dim=0)
    return value.to(device=like.device, dtype=like.dtype)


class PerpNegGuidance(BaseGuidance):
    """Perp-Neg (Armandpour et al. 2023) for diffusers' modular pipelines.

    Args:
        guidance_scale: s, as in classifier-free guidance (with no negatives this guider IS diffusers' CFG).
        negative_weight: w_k of a negative given without its own weight (default 1.0).
        guidance_rescale: rescale of the guided prediction toward the prompt's std (Lin et al. 2023), as in CFG.
        start, stop: fraction of the steps where guidance runs (outside it only ``pred_cond`` is computed).
        enabled: False computes only the prompt's prediction.
        batch_slots: hand the denoiser ONE batch with every slot stacked (one model call per step, as the classic
            pipelines do) instead of one batch per slot (diffusers' convention). Needs a denoiser that passes the
            latents through the guider: SD3 and Flux (``perp_neg_blocks``) do, SDXL's does not (refused).
    """

    _input_predictions = [COND, UNCOND]  # + pred_neg_0 .. pred_neg_{K-1}, as many as set_negatives gave

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, negative_weight: float = 1.0, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True, batch_slots: bool = False):
        super().__init__(start, stop, enabled)
        self.batch_slots = batch_slots
        self._slot_ids: list[str] = []
        if negative_weight < 0:
            raise ValueError("PerpNegGuidance: negative_weight must be >= 0 (negatives are subtracted)")
        self.guidance_scale = guidance_scale
        self.negative_weight = negative_weight
        self.guidance_rescale = guidance_rescale
        self._negatives: list[dict[str, Tensor]] = []
        self._weights: Tensor | None = None
        self._uncond: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the call's negatives
    def set_negatives(self, negatives: Sequence[Mapping[str, Tensor]] = (), weights: Any = None,
                      uncond: Mapping[str, Tensor] | None = None) -> None:
        """The K negatives of the next generation(s), each the model inputs that differ from the prompt's, keyed by the
        denoiser's guider input names (``FIELDS``), with batch 1, the number of prompts, or the full batch.

        ``weights``: w_k >= 0 as [K] or [K, batch] (default ``negative_weight`` each). ``uncond``: the unconditional
        inputs, for denoisers that pass none themselves (Flux) or to replace theirs (``uncond_prompt``)."""
        negatives = [dict(n) for n in negatives]
        if weights is None:
            w = torch.full((len(negatives),), float(self.negative_weight))
        else:
            w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
            if w.ndim == 0:
                w = w.expand(len(negatives))
            if w.ndim not in (1, 2) or w.shape[0] != len(negatives):
                raise ValueError(f"PerpNegGuidance: got weights of shape {tuple(w.shape)} for {len(negatives)} "
                                 "negatives (want [K] or [K, batch])")
            if (w < 0).any():
                raise ValueError("PerpNegGuidance: negative weights must be >= 0 (they are subtracted)")
        self._negatives, self._weights, self._uncond = negatives, w, dict(uncond or {})

    def clear_negatives(self) -> None:
        self.set_negatives([])

    @property
    def num_negatives(self) -> int:
        return len(self._negatives)

    # ------------------------------------------------------------------ diffusers' guider interface
    def _is_guidance_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            first, last = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not first <= self._step < last:
                return False
        # s = 1 without negatives is the prompt's prediction; with negatives it still removes their perpendicular part
        return not (math.isclose(self.guidance_scale, 1.0) and not self._negatives)

    @property
    def num_conditions(self) -> int:
        return 2 + len(self._negatives) if self._is_guidance_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared != 2  # the second prepared batch is the unconditional one

    def guides(self) -> bool:
        """Whether any step of a generation will need the unconditional and negative slots (whatever the step)."""
        return self._enabled and not (math.isclose(self.guidance_scale, 1.0) and not self._negatives)

    def _batches(self, fields: Sequence[str], has_uncond: bool, prepare) -> list:
        """The slots' inputs: ``prepare(tuple_index, identifier)`` builds the prompt's (0) and the denoiser's
        unconditional (1) batches; negatives and ``uncond`` overrides replace their fields."""
        if self.num_conditions == 1:
            return [prepare(0, COND)]
        first = prepare(0, COND)
        unc = prepare(1, UNCOND)
        for name in {n for neg in self._negatives for n in neg} | set(self._uncond):
            if name not in fields:
                raise ValueError(f"PerpNegGuidance: '{name}' is not an input this denoiser gives the guider "
                                 f"({', '.join(fields)}); see FIELDS for the names per pipeline")
        for name, value in self._uncond.items():
            setattr(unc, name, _match_batch(value, getattr(first, name, None), f"the unconditional '{name}'"))
        if not has_uncond and not self._uncond:
            raise ValueError(
                "PerpNegGuidance: the denoiser passed no unconditional inputs (no negative_prompt; the SD3 pipeline "
                "runs CFG only with one): pass negative_prompt='' or uncond_prompt, or set_negatives(uncond=...)")
        out = [first, unc]
        for k, neg in enumerate(self._negatives):
            b = prepare(0, f"{NEG}{k}")
            for name, value in neg.items():
                setattr(b, name, _match_batch(value, getattr(first, name, None), f"negative {k}'s '{name}'"))
            out.append(b)
        return [self._stack(out)] if self.batch_slots else out

    def _stack(self, batches: list) -> Any:
        """The slots as one batch: per-sample tensors (batch = the prompt's) concatenated in slot order, the rest
        (shared tensors, None) kept; :meth:`__call__` splits the prediction again."""
        from diffusers.modular_pipelines import BlockState

        rows = [{k: v for k, v in b.as_dict().items() if k != self._identifier_key} for b in batches]
        differing = [v for k, v in rows[0].items() if isinstance(v, Tensor) and rows[1].get(k) is not v]
        if not differing:
            raise ValueError("PerpNegGuidance: the slots' inputs do not differ; nothing to guide")
        n = differing[0].shape[0]
        merged = {k: (torch.cat([r[k] for r in rows]) if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v)
                  for k, v in rows[0].items()}
        self._slot_ids = [getattr(b, self._identifier_key) for b in batches]
        return BlockState(**merged, **{self._identifier_key: SLOTS})

    def __call__(self, data: list) -> GuiderOutput:
        if len(data) == 1 and getattr(data[0], self._identifier_key) == SLOTS:
            preds = data[0].noise_pred.chunk(len(self._slot_ids))
            return self.forward(**dict(zip(self._slot_ids, preds, strict=True)))
        return super().__call__(data)

    def prepare_inputs(self, data: dict[str, Any]) -> list:
        has_uncond = any(isinstance(v, tuple) and v[1] is not None for v in data.values())
        # a (cond, None) pair (no unconditional from the pipeline) keeps the prompt's value until uncond replaces it
        data = {k: ((v[0], v[0]) if isinstance(v, tuple) and v[1] is None else v) for k, v in data.items()}
        return self._batches(list(data), has_uncond, lambda i, ident: self._prepare_batch(data, i, ident))

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list:
        has_uncond = any(isinstance(v, tuple) and getattr(data, v[1], None) is not None
                         for v in input_fields.values())
        return self._batches(list(input_fields), has_uncond,
                             lambda i, ident: self._prepare_batch_from_block_state(input_fields, data, i, ident))

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None, **negatives: Tensor) -> GuiderOutput:
        if not self._is_guidance_enabled():
            pred = pred_cond
        else:
            negs = [negatives[f"{NEG}{k}"] for k in range(len(self._negatives))]
            w = self._weights if self._weights is not None else torch.zeros(0)
            if w.ndim == 2 and w.shape[1] != pred_cond.shape[0]:  # [K, prompts] -> [K, prompts * images per prompt]
                w = w.repeat_interleave(pred_cond.shape[0] // w.shape[1], dim=1)
            # eps_u + s * ((eps_pos - eps_u) - sum_k w_k perp(eps_neg_k - eps_u, eps_pos - eps_u)); on a flow model's
            # velocity the same (for a fixed x_t, velocity differences are eps differences times one scalar)
            pred = perp_neg_guidance(pred_uncond, pred_cond, negs, w.to(pred_cond.device), self.guidance_scale)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class PerpNegPromptsStep(ModularPipelineBlocks):
    """Encodes ``negative_prompts`` (and ``uncond_prompt``) with the pipeline's own text encoder step and hands them to
    the :class:`PerpNegGuidance` guider; placed right after the text encoder step by :func:`perp_neg_blocks`.

    Inputs: ``negative_prompts`` (K prompts; a str is one prompt, a list of B strings one per batch prompt),
    ``negative_weights`` ([K] or [K, batch], >= 0), ``uncond_prompt`` (the unconditional text; diffusers'
    ``negative_prompt`` keeps meaning it, and both with ``negative_prompts`` is the same ValueError as the classic
    pipelines')."""

    model_name = None

    def __init__(self, encoder: ModularPipelineBlocks, family: str):
        super().__init__()
        self._encoder = encoder
        self._family = family
        self._fields = dict(FIELDS[family])

    @property
    def description(self) -> str:
        return "Perp-Neg: encodes negative_prompts with the text encoder step and sets them on the PerpNegGuidance guider"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [*self._encoder.expected_components,
                ComponentSpec("guider", PerpNegGuidance, default_creation_method="from_config")]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("negative_prompts", description="Perp-Neg negatives: K prompts (a str is one prompt)"),
                InputParam("negative_weights", description="w_k >= 0, [K] or [K, batch] (default 1.0 each)"),
                InputParam("uncond_prompt", description="the unconditional text (default: negative_prompt, or '')"),
                InputParam("negative_prompt"), InputParam("prompt")]

    @property
    def intermediate_outputs(self) -> list:
        return []

    def _encode(self, components: Any, state: PipelineState, prompts: list[str]) -> dict[str, Tensor]:
        sub = PipelineState()
        for p in self._encoder.inputs:
            if p.name and "prompt" not in p.name:  # max_sequence_length, clip_skip, joint_attention_kwargs ...
                sub.set(p.name, state.get(p.name))
        sub.set("prompt", prompts)
        self._encoder(components, sub)
        return {field: sub.get(name) for field, name in self._fields.items()}

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        bs = self.get_block_state(state)
        negatives = prompt_group(bs.negative_prompts)
        guider = components.guider
        if not isinstance(guider, PerpNegGuidance):
            if negatives:
                raise ValueError("negative_prompts need the PerpNegGuidance guider: "
                                 "pipe.update_components(guider=PerpNegGuidance(guidance_scale=...))")
            return components, state
        if guider.batch_slots and self._family == "stable-diffusion-xl":
            raise ValueError("PerpNegGuidance(batch_slots=True) needs a denoiser that passes the latents through the "
                             "guider (SD3, Flux); SDXL's reads them from the block state: use batch_slots=False")
        uncond = resolve_uncond(bs.negative_prompt, negatives, bs.uncond_prompt, "modular pipeline")
        prompt = bs.prompt
        if prompt is None:
            raise ValueError("Perp-Neg in a modular pipeline needs prompt= (the negatives are encoded like it)")
        n = 1 if isinstance(prompt, str) else len(prompt)
        negs = [self._encode(components, state, as_batch(p, n, "negative_prompts")) for p in negatives]
        unc = None
        # the unconditional text: replaces the pipeline's (uncond_prompt), or where it made none (Flux; SD3 without
        # negative_prompt) and guidance will run
        if bs.uncond_prompt is not None or (state.get("negative_prompt_embeds") is None and (guider.guides() or negs)):
            unc = self._encode(components, state, as_batch(uncond or "", n, "uncond_prompt"))
        guider.set_negatives(negs, bs.negative_weights, uncond=unc)
        return components, state


class PerpNegFluxLoopDenoiser(ModularPipelineBlocks):
    """The Flux denoising step with a guider (the stock Flux step has none): the prompt's inputs and the guider's
    slots, one transformer call per slot. Flux-dev keeps its distilled ``guidance`` embedding in every slot; the
    unconditional and negative slots are "true CFG" passes (K + 2 transformer calls per step instead of 1)."""

    model_name = "flux"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers import FluxTransformer2DModel

        return [ComponentSpec("transformer", FluxTransformer2DModel),
                ComponentSpec("guider", PerpNegGuidance, default_creation_method="from_config")]

    @property
    def description(self) -> str:
        return "Flux denoising step whose prediction is combined by the guider (Perp-Neg)"

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("joint_attention_kwargs"), InputParam("latents", required=True),
                InputParam("guidance"), InputParam("prompt_embeds", required=True),
                InputParam("pooled_prompt_embeds", required=True), InputParam("txt_ids", required=True),
                InputParam("img_ids", required=True), InputParam("num_inference_steps")]

    @torch.no_grad()
    def __call__(self, components: Any, block_state: Any, i: int, t: Tensor) -> tuple[Any, Any]:
        guider = components.guider
        guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        batches = guider.prepare_inputs({
            "hidden_states": block_state.latents, "guidance": block_state.guidance,  # the same in every slot
            "encoder_hidden_states": (block_state.prompt_embeds, None),
            "pooled_projections": (block_state.pooled_prompt_embeds, None),
        })
        for b in batches:
            guider.prepare_models(components.transformer)
            x = b.hidden_states
            b.noise_pred = components.transformer(
                hidden_states=x, timestep=t.flatten().expand(x.shape[0]) / 1000, guidance=getattr(b, "guidance", None),
                encoder_hidden_states=b.encoder_hidden_states, pooled_projections=b.pooled_projections,
                joint_attention_kwargs=block_state.joint_attention_kwargs, txt_ids=block_state.txt_ids,
                img_ids=block_state.img_ids, return_dict=False)[0]
            guider.cleanup_models(components.transformer)
        block_state.noise_pred = guider(batches).pred
        return components, block_state


def _sub(blocks: Any, path: Sequence[str]) -> Any:
    for name in path:
        blocks = blocks.sub_blocks[name]
    return blocks


def perp_neg_blocks(blocks: Any) -> Any:
    """``blocks`` (a modular pipeline's blocks: SDXL, SD3, Flux) with :class:`PerpNegPromptsStep` after the text encoder
    step (Flux: and :class:`PerpNegFluxLoopDenoiser` in the denoising loop); changed in place and returned. Then give
    the pipeline the :class:`PerpNegGuidance` guider."""
    family = getattr(blocks, "model_name", None)
    if family not in ("stable-diffusion-xl", "stable-diffusion-3", "flux") or "text_encoder" not in blocks.sub_blocks:
        raise ValueError(f"perp_neg_blocks: {type(blocks).__name__} (model '{family}') is not supported; supported: "
                         "the SDXL, SD3 and Flux auto blocks. Other guider pipelines take PerpNegGuidance with "
                         "set_negatives(...) (see FIELDS)")
    step = PerpNegPromptsStep(blocks.sub_blocks["text_encoder"], family)
    blocks.sub_blocks.insert("perp_neg_prompts", step, list(blocks.sub_blocks).index("text_encoder") + 1)
    if family == "flux":
        _sub(blocks, ["denoise", "denoise"]).sub_blocks["denoiser"] = PerpNegFluxLoopDenoiser()
    return blocks
