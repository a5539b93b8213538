"""What the flow-matching Perp-Neg pipelines (SD3, Flux) share: per-image embedding batches, the chunked batched
transformer call, the negatives' weights and their encoding (each pipeline brings its own ``encode_prompt`` call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .pipeline import PerpNegStableDiffusionPipeline, as_batch


def per_image(x: torch.Tensor, batch_size: int, nipp: int, what: str) -> torch.Tensor:
    """Embeddings given per prompt ([batch]), once ([1]) or per image ([batch * nipp]) as [batch * nipp, ...]."""
    n = batch_size * nipp
    if x.shape[0] == n:
        return x
    if x.shape[0] == batch_size:
        return x.repeat_interleave(nipp, dim=0)  # the order of diffusers' repeat(1, nipp, 1).view(n, ...)
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"{what}: batch of {x.shape[0]}, expected 1, {batch_size} (prompts) or {n} (images)")


def chunked_forward(forward: Callable, batched: dict[str, torch.Tensor | None], chunk: int | None,
                    context: Callable | None = None, **shared: Any) -> torch.Tensor:
    """``forward(**batched, **shared)`` over the whole stacked batch in one call, or in chunks of at most ``chunk``
    samples (the tensors in ``batched`` are sliced along dim 0, ``shared`` is passed as is). ``context(j)``, when
    given, wraps chunk j (diffusers' ``transformer.cache_context``: each chunk keeps its own cache state)."""
    total = next(v for v in batched.values() if v is not None).shape[0]
    step = total if not chunk or chunk >= total else int(chunk)
    outs = []
    for j, s in enumerate(range(0, total, step)):
        part = {k: (None if v is None else v[s : s + step]) for k, v in batched.items()}
        if context is None:
            outs.append(forward(**part, **shared, return_dict=False)[0])
        else:
            with context(j):
                outs.append(forward(**part, **shared, return_dict=False)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def negative_weights_matrix(weights: Any, k: int, batch_size: int, nipp: int, device) -> torch.Tensor:
    """``negative_weights`` (None: 1.0 each, [K] or [K, batch]) as [K, batch * nipp]; a ValueError if any is < 0."""
    w = PerpNegStableDiffusionPipeline._expand_weights(weights, k, batch_size, nipp, 1.0, device)
    if (w < 0).any():
        raise ValueError("negative_weights must be >= 0 (they are subtracted)")
    return w


def encode_negatives(
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    prompts: Sequence[str | list[str]],
    embeds: Sequence[torch.Tensor] | None,
    pooled: Sequence[torch.Tensor] | None,
    batch_size: int,
    nipp: int,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K negatives as token embeddings [n, L, D] and pooled embeddings [n, P] (n = batch * nipp): given
    (``embeds`` + ``pooled``, one per negative, per prompt, once or per image), or encoded with ``encode(prompts of
    the batch) -> (tokens, pooled)``, the pipeline's own ``encode_prompt`` with ``nipp`` images per prompt."""
    if embeds is not None:
        if pooled is None or len(pooled) != len(embeds):
            raise ValueError("negative_prompts_embeds needs negative_pooled_prompts_embeds (one per negative), as "
                             "prompt_embeds needs pooled_prompt_embeds")
        return ([per_image(e, batch_size, nipp, "negative_prompts_embeds").to(device) for e in embeds],
                [per_image(p, batch_size, nipp, "negative_pooled_prompts_embeds").to(device) for p in pooled])
    out = [encode(as_batch(p, batch_size, "negative_prompts")) for p in prompts]
    return [e for e, _ in out], [pe for _, pe in out]
