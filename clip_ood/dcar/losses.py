"""DCAR category-level loss: symmetric contrastive loss whose negatives are weighted by category matching.

For image i with caption i (features normalised, s = logit_scale * cosine):

    L_i2t(i) = -log( e^{s_ii} / (e^{s_ii} + sum_{j != i} w_ij e^{s_ij} + sum_k u_ik e^{s(i, n_ik)}) )
    L_t2i(i) = -log( e^{s_ii} / (e^{s_ii} + sum_{j != i} w_ji e^{s_ji}) )
    L_cat    = (mean_i L_i2t + mean_i L_t2i) / 2

with in-batch negatives j (other categories' captions and same-category captions with other attributes),
extra caption negatives n_ik (FDRD ``negative`` list / captions with the class name swapped), and weights
``w = 1 + alpha * m(c_i, c_j)`` from the category-matching similarity m in [0, 1] (m(c, c) = 1): negatives of
the same or a similar category count more. A weight of 0 removes a negative (used for false negatives: an
in-batch caption identical to the positive). alpha = 0, no extra negatives = CLIP's InfoNCE (CoOp baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def category_similarity(cat_feats: Tensor) -> Tensor:
    """m(c, c') = max(cos(t_c, t_c'), 0) for category text features [C, D]; diagonal exactly 1."""
    f = F.normalize(cat_feats.float(), dim=-1)
    m = (f @ f.T).clamp(min=0.0, max=1.0)
    m.fill_diagonal_(1.0)
    return m


def negative_weights(cat_sim: Tensor, cats_a: Tensor, cats_b: Tensor, alpha: float) -> Tensor:
    """w_ab = 1 + alpha * m(c_a, c_b): [len(a), len(b)] from category ids (``-1`` = unknown -> m = 1)."""
    a = cats_a.clamp(min=0)
    b = cats_b.clamp(min=0)
    m = cat_sim[a[:, None], b[None, :]]
    unknown = (cats_a[:, None] < 0) | (cats_b[None, :] < 0)
    m = torch.where(unknown, torch.ones_like(m), m)
    return 1.0 + alpha * m


def same_text_mask(texts: Sequence[str]) -> Tensor:
    """[B, B] bool: True where captions i and j are the identical string (false negatives, incl. diagonal)."""
    ids: dict[str, int] = {}
    code = torch.tensor([ids.setdefault(t, len(ids)) for t in texts])
    return code[:, None] == code[None, :]


def _weighted_nce(pos: Tensor, neg: Tensor, w: Tensor) -> Tensor:
    """-log(e^pos / (e^pos + sum_j w_j e^neg_j)) per row, computed stably with logsumexp."""
    # log(w e^s) = s + log w ; w = 0 -> -inf (the negative is dropped)
    neg_terms = neg + torch.log(w.clamp(min=0.0))
    all_terms = torch.cat([pos[:, None], neg_terms], dim=1)
    return torch.logsumexp(all_terms, dim=1) - pos


def weighted_contrastive_loss(img: Tensor, txt: Tensor, logit_scale: Tensor | float, *,
                              w_batch: Tensor | None = None, neg_txt: Tensor | None = None,
                              w_neg: Tensor | None = None) -> dict[str, Tensor]:
    """L_cat for normalised image [B, D] / caption [B, D] features, in-batch weights [B, B] (diag ignored),
    extra negative captions [B, K, D] with weights [B, K]. Returns {"loss", "loss_i2t", "loss_t2i"}."""
    B = img.shape[0]
    scale = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
    S = scale * img @ txt.T  # s_ij = tau^-1 cos(v_i, t_j)
    if w_batch is None:
        w_batch = torch.ones(B, B, device=S.device, dtype=S.dtype)
    w_batch = w_batch.to(S)
    off = ~torch.eye(B, dtype=torch.bool, device=S.device)
    pos = S.diagonal()
    neg_i2t = S[off].view(B, B - 1)
    wi2t = w_batch[off].view(B, B - 1)
    if neg_txt is not None and neg_txt.numel():
        Sn = scale * torch.einsum("bd,bkd->bk", img, neg_txt)  # s(i, n_ik)
        wn = torch.ones_like(Sn) if w_neg is None else w_neg.to(Sn)
        neg_i2t = torch.cat([neg_i2t, Sn], dim=1)
        wi2t = torch.cat([wi2t, wn], dim=1)
    l_i2t = _weighted_nce(pos, neg_i2t, wi2t).mean()
    # text -> image: for caption i the negatives are images j with weight w_ji (same category matching)
    ST = S.T
    wT = w_batch.T
    l_t2i = _weighted_nce(pos, ST[off].view(B, B - 1), wT[off].view(B, B - 1)).mean()
    return {"loss": 0.5 * (l_i2t + l_t2i), "loss_i2t": l_i2t, "loss_t2i": l_t2i}
