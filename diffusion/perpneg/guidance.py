"""Perp-Neg guidance math (Armandpour et al. 2023): perpendicular projection and the guided noise estimate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-6


def perpendicular_component(x: Tensor, y: Tensor, eps: float = EPS) -> Tensor:
    """Per sample (dim 0 is the batch), the part of ``x`` perpendicular to ``y``: x - <x,y>/max(||y||^2, eps) * y.

    Args:
        x: [B, ...] the vectors to project (one per sample; any trailing shape, or [B] for scalars).
        y: [B, ...] the directions, same shape as ``x``.
        eps: lower bound on ||y||^2 (default 1e-6), so a zero ``y`` leaves ``x`` unchanged.

    Returns:
        [B, ...] in the dtype of ``x`` (the dot products and norms are computed in float32).
    """
    if x.shape != y.shape:
        raise ValueError(f"perpendicular_component: shapes differ, x {tuple(x.shape)} vs y {tuple(y.shape)}")
    dtype = x.dtype
    xf, yf = x.float(), y.float()  # reductions in fp32: fp16 sums over 64x64x4 latents overflow
    dims = tuple(range(1, x.ndim))
    if not dims:  # a batch of scalars: each sample is 1-D
        xf, yf = xf[:, None], yf[:, None]
        dims = (1,)
    dot = (xf * yf).sum(dim=dims, keepdim=True)  # <x, y>
    norm2 = (yf * yf).sum(dim=dims, keepdim=True).clamp_min(eps)  # max(||y||^2, eps)
    out = xf - (dot / norm2) * yf  # x_perp = x - (<x,y> / ||y||^2) y
    return out.reshape(x.shape).to(dtype)


def _weights(weights: Tensor | Sequence[float] | float, k: int, b: int, like: Tensor) -> Tensor:
    """Weights as a [K, B] tensor (given as a scalar, [K] or [K, B])."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=like.device)
    if w.ndim == 0:
        w = w.expand(k)
    if w.ndim == 1:
        if w.shape[0] != k:
            raise ValueError(f"got {w.shape[0]} weights for {k} prompts")
        w = w[:, None].expand(k, b)
    if w.shape != (k, b):
        raise ValueError(f"weights must have shape [K]={k} or [K, B]=({k}, {b}), got {tuple(w.shape)}")
    return w


def _scale(guidance_scale: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(guidance_scale, Tensor) and guidance_scale.ndim == 1:  # one scale per sample
        return guidance_scale.float().view(-1, *([1] * (like.ndim - 1))).to(like.device)
    return guidance_scale


def perp_composition(
    noise_uncond: Tensor,
    noise_main: Tensor,
    noise_others: Tensor | Sequence[Tensor],
    weights: Tensor | Sequence[float],
    guidance_scale: Tensor | float,
) -> Tensor:
    """The paper's composition: eps_u + s * (e_main + sum_k w_k * perp(e_k, e_main)), e_i = eps_i - eps_u.

    Args:
        noise_uncond: [B, ...] eps(x_t), the unconditional noise estimate.
        noise_main: [B, ...] eps(x_t, c_main), the estimate for the main prompt.
        noise_others: [K, B, ...] (or a sequence of K [B, ...]) the estimates for the K other prompts.
        weights: signed w_k: > 0 adds the perpendicular part of a positive prompt, < 0 removes that of a negative
            one; a scalar, [K] (shared over the batch) or [K, B] (per sample, e.g. view-dependent weights).
        guidance_scale: s, a float or a [B] tensor (one scale per sample).

    Returns:
        [B, ...] the composed noise estimate, in the dtype of ``noise_main``.
    """
    if not isinstance(noise_others, Tensor):
        noise_others = torch.stack(list(noise_others)) if len(noise_others) else noise_main.new_zeros((0, *noise_main.shape))
    k, b = noise_others.shape[0], noise_main.shape[0]
    if noise_others.shape[1:] != noise_main.shape or noise_uncond.shape != noise_main.shape:
        raise ValueError(
            f"shapes: uncond {tuple(noise_uncond.shape)}, main {tuple(noise_main.shape)}, others {tuple(noise_others.shape)}"
        )
    w = _weights(weights, k, b, noise_main)
    e_main = (noise_main - noise_uncond).float()  # e_pos = eps(x_t, c_pos) - eps(x_t)
    delta = e_main.clone()
    for i in range(k):
        e_i = (noise_others[i] - noise_uncond).float()  # e_i = eps(x_t, c_i) - eps(x_t)
        w_i = w[i].view(-1, *([1] * (e_main.ndim - 1)))
        delta = delta + w_i * perpendicular_component(e_i, e_main)  # + w_i * e_i^perp (perp to e_pos)
    out = noise_uncond.float() + _scale(guidance_scale, e_main) * delta  # eps_u + s * (...)
    return out.to(noise_main.dtype)


def perp_neg_guidance(
    noise_uncond: Tensor,
    noise_pos: Tensor,
    noise_negs: Tensor | Sequence[Tensor],
    neg_weights: Tensor | Sequence[float],
    guidance_scale: Tensor | float,
) -> Tensor:
    """Perp-Neg: eps_u + s * ((eps_pos - eps_u) - sum_k w_k * perp(eps_neg_k - eps_u, eps_pos - eps_u)).

    With every w_k = 0 this is plain classifier-free guidance.

    Args:
        noise_uncond: [B, ...] eps(x_t), the unconditional noise estimate.
        noise_pos: [B, ...] eps(x_t, c_pos), the estimate for the main prompt.
        noise_negs: [K, B, ...] (or a sequence of K [B, ...]) eps(x_t, c_neg_k) for the K negative prompts.
        neg_weights: w_k >= 0 (subtracted), a scalar, [K] (shared over the batch) or [K, B] (per sample).
        guidance_scale: s, a float or a [B] tensor (one scale per sample).

    Returns:
        [B, ...] the guided noise estimate, in the dtype of ``noise_pos``.
    """
    w = torch.as_tensor(neg_weights, dtype=torch.float32)
    if (w < 0).any():
        raise ValueError("perp_neg_guidance: negative weights must be >= 0 (they are subtracted)")
    return perp_composition(noise_uncond, noise_pos, noise_negs, -w, guidance_scale)

