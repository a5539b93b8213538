"""OOD scores from CLIP features, higher = more in-distribution: MCM, energy, max-logit here; NegLabel
(``clip_ood.neglabel``) and ANTS, its test-time variant (``clip_ood.ants``), in their own modules.

Every score is registered in ``SCORES`` next to its function with ``@register_score`` (``clip_ood.score_registry``);
this module imports every module that registers one, so ``SCORES`` here lists them all. ``OODScorer`` (so also the
API it serves) and the ``negvision ood --method`` option read the methods from there, so a new score is one
decorated function (in its own module: one import line below). The decorated function takes image features first,
then any of the inputs the scorer supplies (``SCORE_INPUTS``) by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import clip_ood.ants  # noqa: F401  (registers "ants", next to its test-time state)
from clip_ood.lexicon import PHOTO_TEMPLATE
from clip_ood.neglabel import neglabel_score, neglabel_score_prepared, prepare_negatives
from clip_ood.score_registry import SCORE_INPUTS, SCORES, ScoreInputs, ScoreSpec, register_score

__all__ = ["SCORES", "SCORE_INPUTS", "ScoreInputs", "ScoreSpec", "energy_score", "id_probabilities",
           "max_logit_score", "mcm_score", "nearest_labels", "neglabel_score", "neglabel_score_prepared",
           "prepare_negatives", "register_score", "score_spec"]


def score_spec(method: str) -> ScoreSpec:
    """The registered spec of ``method``; ``ValueError`` listing the registered methods otherwise."""
    if method not in SCORES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCORES.names())}")
    return SCORES.get(method)  # type: ignore[return-value]


def _cos(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Cosine similarities [N, C] of L2-normalised rows (float32)."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def id_probabilities(image_features: Tensor, id_text_features: Tensor, temperature: float = 0.01) -> Tensor:
    """Zero-shot class probabilities [N, C] = softmax(cos / temperature) over the ID classes."""
    return torch.softmax(_cos(image_features, id_text_features) / temperature, dim=-1)


@register_score("mcm", default_temperature=1.0, default_id_templates=(PHOTO_TEMPLATE,))
def mcm_score(image_features: Tensor, id_text_features: Tensor, temperature: float = 1.0) -> Tensor:
    """MCM (Ming et al., 2022): max_c softmax(cos / temperature)_c, shape [N].

    Args:
        image_features: [N, D] image features (any scale; normalised here).
        id_text_features: [C, D] ID class text features (normalised here).
        temperature: softmax temperature of cos / temperature (default 1.0).

    Returns:
        [N] scores in [1/C, 1]; higher = more in-distribution.
    """
    return id_probabilities(image_features, id_text_features, temperature).max(dim=-1).values


@register_score("energy", default_id_templates=(PHOTO_TEMPLATE,))
def energy_score(image_features: Tensor, id_text_features: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy: temperature * logsumexp_c(cos / temperature), shape [N]."""
    return temperature * torch.logsumexp(_cos(image_features, id_text_features) / temperature, dim=-1)


@register_score("max_logit", default_id_templates=(PHOTO_TEMPLATE,))
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

