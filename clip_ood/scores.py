"""OOD scores from CLIP features: NegLabel, MCM, energy, max-logit. Higher score = more in-distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _cos(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Cosine similarities [N, C] of L2-normalised rows (float32)."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def neglabel_score(
    image_features: Tensor,
    id_text_features: Tensor,
    neg_text_features: Tensor,
    temperature: float = 0.01,
    num_groups: int = 100,
    seed: int = 0,
) -> Tensor:
    """NegLabel score [N] with grouping (Jiang et al., ICLR 2024): mean over groups of the ID softmax mass.

    Negatives are permuted with ``torch.randperm(M, generator=Generator().manual_seed(seed))``, the last
    ``M % num_groups`` dropped, the rest split into ``num_groups`` groups; per group the softmax runs over
    [ID | group] of cos / temperature and the ID probabilities are summed. With M < num_groups, M groups of one
    are used; with no negatives the score is 1.
    """
    neg, g = prepare_negatives(neg_text_features, num_groups, seed)
    return neglabel_score_prepared(image_features, F.normalize(id_text_features.float(), dim=-1), neg, g, temperature)


def prepare_negatives(neg_text_features: Tensor, num_groups: int = 100, seed: int = 0) -> tuple[Tensor, int]:
    """Normalised, permuted negatives with the last M % groups dropped, and the number of groups used.

    Do this once per negative set; ``neglabel_score_prepared`` then costs two matmuls per image batch.
    """
    m = neg_text_features.shape[0]
    if m == 0:
        return neg_text_features.float(), 0
    g = min(num_groups, m)
    k = m // g
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[: g * k].to(neg_text_features.device)
    return F.normalize(neg_text_features.float()[perm], dim=-1), g


def neglabel_score_prepared(image_features: Tensor, id_unit: Tensor, neg_prepared: Tensor, num_groups: int,
                            temperature: float = 0.01) -> Tensor:
    """NegLabel score from unit ID features and ``prepare_negatives`` output (see ``neglabel_score``)."""
    n = image_features.shape[0]
    img = F.normalize(image_features.float(), dim=-1)
    cos_id = img @ id_unit.T / temperature  # [N, C]
    if num_groups == 0:
        return torch.ones(n, device=cos_id.device)
    k = neg_prepared.shape[0] // num_groups
    cos_neg = img @ neg_prepared.T / temperature  # [N, g*k]
    lse_id = torch.logsumexp(cos_id, dim=-1, keepdim=True)  # log sum_c exp(s_c / t)      [N, 1]
    lse_grp = torch.logsumexp(cos_neg.view(n, num_groups, k), dim=-1)  # log sum_{j in G_i} exp(s_j / t)  [N, g]
    # S(x) = 1/g sum_i  sum_c e^{s_c/t} / (sum_c e^{s_c/t} + sum_{j in G_i} e^{s_j/t})  = mean_i sigmoid(lse_id - lse_grp_i)
    return torch.sigmoid(lse_id - lse_grp).mean(dim=-1)


def id_probabilities(image_features: Tensor, id_text_features: Tensor, temperature: float = 0.01) -> Tensor:
    """Zero-shot class probabilities [N, C] = softmax(cos / temperature) over the ID classes."""
    return torch.softmax(_cos(image_features, id_text_features) / temperature, dim=-1)


def mcm_score(image_features: Tensor, id_text_features: Tensor, temperature: float = 1.0) -> Tensor:
    """MCM (Ming et al., 2022): max_c softmax(cos / temperature)_c, shape [N]."""
    return id_probabilities(image_features, id_text_features, temperature).max(dim=-1).values


def energy_score(image_features: Tensor, id_text_features: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy: temperature * logsumexp_c(cos / temperature), shape [N]."""
    return temperature * torch.logsumexp(_cos(image_features, id_text_features) / temperature, dim=-1)


def max_logit_score(image_features: Tensor, id_text_features: Tensor) -> Tensor:
    """Max-logit baseline: max_c cos(image, class c), shape [N]."""
    return _cos(image_features, id_text_features).max(dim=-1).values


def nearest_labels(image_features: Tensor, text_features: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The k most similar text rows per image: (cosines [N, k], indices [N, k])."""
    k = min(k, text_features.shape[0])
    if k == 0:
        n = image_features.shape[0]
        return torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long)
    return _cos(image_features, text_features).topk(k, dim=-1)


SCORES = {"neglabel": neglabel_score, "mcm": mcm_score, "energy": energy_score, "max_logit": max_logit_score}
