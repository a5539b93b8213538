"""DCAR attribute level: weights of attribute descriptions from text-image mutual information.

Estimator (the paper says only "text-image mutual information"; this is our choice). For attribute
description a and N training pairs j: Z_j = 1 if pair j carries attribute a (from the data's ``attributes``),
S_j = cos(v_j, t_a) the similarity of image j to the text of a under the current prompts. S is cut into
``n_bins`` equal-frequency (quantile) bins and the plug-in estimate

    I(Z; S) = sum_{z, b} p(z, b) log( p(z, b) / (p(z) p(b)) )          (nats)

is divided by H(Z) (so 0 <= NMI <= 1 and attributes with different base rates compare); an attribute that is
always or never present gets 0. New weights w' = A * softmax(NMI / tau) (mean 1 over the vocabulary of A
attributes) and the running weights move by EMA:  w <- (1 - eta) w + eta w'. Attributes whose text the images
"agree with" (high NMI) thus weigh more in the attribute loss

    L_attr = sum_i sum_{a in A_i} w_a * -log( e^{s_ia} / (e^{s_ia} + sum_{a' not in A_i} e^{s_ia'}) ) / sum w_a

(s = logit_scale * cos, multi-positive InfoNCE over the attribute vocabulary, each positive vs the image's
non-attributes). The update runs at the start of training and after every epoch on up to ``max_pairs`` pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def mutual_information(scores: Tensor, labels: Tensor, n_bins: int = 8, normalized: bool = True) -> float:
    """Plug-in I(Z; S) of binary labels Z [N] and scores S [N] binned at quantiles; / H(Z) if ``normalized``."""
    z = labels.bool().flatten().cpu()
    s = scores.float().flatten().cpu()
    n = z.numel()
    n_pos = int(z.sum())
    if n == 0 or n_pos in (0, n):
        return 0.0
    n_bins = max(1, min(int(n_bins), n))
    order = torch.argsort(s, stable=True)
    bins = torch.empty(n, dtype=torch.long)
    bins[order] = torch.arange(n) * n_bins // n  # equal-frequency bins by rank
    joint = torch.zeros(2, n_bins, dtype=torch.float64)
    joint.index_put_((z.long(), bins), torch.ones(n, dtype=torch.float64), accumulate=True)
    p = joint / n
    pz = p.sum(1, keepdim=True)
    pb = p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pz @ pb)[nz]).log()).sum())
    if not normalized:
        return mi
    hz = -sum(float(q) * math.log(float(q)) for q in pz.flatten() if q > 0)
    return mi / hz if hz > 0 else 0.0


def attribute_labels(attr_lists: Sequence[Sequence[str]], vocab: Sequence[str]) -> Tensor:
    """[N, A] bool: pair j carries attribute vocab[a]."""
    index = {a: k for k, a in enumerate(vocab)}
    out = torch.zeros(len(attr_lists), len(vocab), dtype=torch.bool)
    for j, attrs in enumerate(attr_lists):
        for a in attrs:
            if a in index:
                out[j, index[a]] = True
    return out


def mi_weights(img_feats: Tensor, attr_feats: Tensor, labels: Tensor, tau: float = 0.1, n_bins: int = 8
               ) -> tuple[Tensor, Tensor]:
    """(NMI [A], new weights w' = A * softmax(NMI / tau) [A]) from image [N, D] and attribute-text [A, D] features."""
    img = torch.nn.functional.normalize(img_feats.float(), dim=-1)
    att = torch.nn.functional.normalize(attr_feats.float(), dim=-1)
    S = img @ att.T  # S_ja = cos(v_j, t_a)
    nmi = torch.tensor([mutual_information(S[:, a], labels[:, a], n_bins) for a in range(att.shape[0])])
    w = att.shape[0] * torch.softmax(nmi / tau, dim=0)
    return nmi, w


def ema_update(w: Tensor, w_new: Tensor, eta: float) -> Tensor:
    """w <- (1 - eta) w + eta w'."""
    return (1.0 - eta) * w + eta * w_new.to(w)


def attribute_loss(img: Tensor, attr: Tensor, labels: Tensor, weights: Tensor, logit_scale: Tensor | float
                   ) -> Tensor:
    """L_attr for normalised image [B, D] and attribute-text [A, D] features, labels [B, A], weights [A]."""
    scale = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
    S = scale * img @ attr.T  # [B, A]
    labels = labels.to(S.device).bool()
    if not labels.any():
        return S.sum() * 0.0
    neg = S.masked_fill(labels, float("-inf"))  # each positive competes with the image's non-attributes
    lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # [B, 1]
    per = torch.logaddexp(S, lse_neg) - S  # -log(e^s / (e^s + sum_neg e^s'))
    w = weights.to(S)[None, :].expand_as(S) * labels
    return (per * w).sum() / w.sum().clamp(min=1e-12)
