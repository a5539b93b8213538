"""NegLabel (Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language Models", ICLR 2024):
the grouped score against mined negative labels (the labels themselves are mined in ``clip_ood.lexicon``).

Registered as ``"neglabel"`` next to its code; ANTS (``clip_ood.ants``) uses it as its base score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_ood.score_registry import ScoreInputs, register_score


def neglabel_bind(inputs: ScoreInputs) -> Callable[[Tensor], Tensor]:
    """NegLabel with the ID features normalised and the negatives permuted and grouped once (two matmuls a batch)."""
    id_unit = F.normalize(inputs.id_text_features.float(), dim=-1)
    neg, groups = prepare_negatives(inputs.neg_text_features, inputs.num_groups, inputs.seed)
    return lambda image_features: neglabel_score_prepared(image_features, id_unit, neg, groups, inputs.temperature)


@register_score("neglabel", needs_negatives=True, bind=neglabel_bind)
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

    Args:
        image_features: [N, D] image features (any scale; normalised here).
        id_text_features: [C, D] ID class text features (normalised here).
        neg_text_features: [M, D] negative-label text features (M may be 0).
        temperature: softmax temperature t of cos / t (default 0.01).
        num_groups: number of negative groups g (default 100; min(g, M) are used).
        seed: seed of the negatives' permutation (default 0).

    Returns:
        [N] scores in [0, 1]; higher = more in-distribution.
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
