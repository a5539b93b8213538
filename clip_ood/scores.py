"""OOD scores from CLIP features: NegLabel, MCM, energy, max-logit (and ANTS, NegLabel's test-time variant).
Higher score = more in-distribution.

Every score is registered in ``SCORES`` next to its function with ``@register_score``; ``OODScorer`` (so also
the API it serves) and the ``negvision ood --method`` option read the methods from there, so a new score is one
decorated function. The decorated function takes image features first, then any of the inputs the scorer supplies
(``SCORE_INPUTS``) by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_ood.lexicon import ID_TEMPLATE, PHOTO_TEMPLATE
from vision.registry import Registry


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer hands a score, fixed for its lifetime (the image features come per batch)."""

    id_text_features: Tensor  # [C, D] ID class features (L2-normalised)
    neg_text_features: Tensor  # [M, D] negative-label features (M = 0 without negatives)
    temperature: float
    num_groups: int = 100
    seed: int = 0


SCORE_INPUTS = tuple(f.name for f in fields(ScoreInputs))


@dataclass(frozen=True)
class ScoreSpec:
    """One registered OOD score: its function, what it takes and how a scorer runs it.

    ``fn(image_features [N, D], **inputs) -> [N]``, ``inputs`` naming ``ScoreInputs`` fields; ``bind`` (optional)
    precomputes what does not change between batches and returns a batch scorer; ``state`` (optional) builds
    a test-time state ``state(encoder, id_labels, inputs)`` whose ``step(features, images)`` returns a dict with
    the final ``"score"`` (``fn`` is then its base score).
    """

    name: str
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    needs_negatives: bool = False
    default_temperature: float = 0.01
    bind: Callable[[ScoreInputs], Callable[[Tensor], Tensor]] | None = None
    state: Callable[[Any, list[str], ScoreInputs], Any] | None = None
    default_id_templates: tuple[str, ...] = (ID_TEMPLATE,)

    def __call__(self, image_features: Tensor, inputs: ScoreInputs) -> Tensor:
        """Scores [N] of one batch (the plain path, without ``bind``'s precomputation)."""
        return self.fn(image_features, **{k: getattr(inputs, k) for k in self.inputs})

    def batch_scorer(self, inputs: ScoreInputs) -> Callable[[Tensor], Tensor]:
        """A function scoring image-feature batches [N, D] -> [N] with these fixed inputs."""
        if self.bind is not None:
            return self.bind(inputs)
        return lambda image_features: self(image_features, inputs)


SCORES: Registry[Tensor] = Registry("OOD score")


def _score_inputs(fn: Callable[..., Tensor]) -> tuple[str, ...]:
    """The ``ScoreInputs`` fields ``fn`` takes after the image features (other parameters need defaults)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    missing = [p.name for p in params if p.name not in SCORE_INPUTS and p.default is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"score {fn.__name__}: parameters {missing} are not scorer inputs ({', '.join(SCORE_INPUTS)}) "
                        "and have no default")
    return tuple(p.name for p in params if p.name in SCORE_INPUTS)


def register_score(name: str | None = None, *, needs_negatives: bool = False, default_temperature: float = 0.01,
                   bind: Callable[[ScoreInputs], Callable[[Tensor], Tensor]] | None = None,
                   state: Callable[[Any, list[str], ScoreInputs], Any] | None = None,
                   default_id_templates: tuple[str, ...] = (ID_TEMPLATE,),
                   override: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering a score function in ``SCORES`` (see ``ScoreSpec``); returns the function unchanged.

    Args:
        name: method name (default: the function's name without a ``_score`` suffix).
        needs_negatives: the score needs mined negative labels (``OODScorer`` refuses to run without them).
        default_temperature: temperature used when the scorer is given none.
        bind: optional ``bind(inputs) -> batch_scorer`` precomputing the fixed inputs once.
        state: optional test-time state factory ``state(encoder, id_labels, inputs)`` (ANTS).
        default_id_templates: the ID prompt templates used when the scorer is given none (the method paper's).
        override: replace an existing entry of the same name.
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        key = name or fn.__name__.removesuffix("_score")
        spec = ScoreSpec(key, fn, _score_inputs(fn), needs_negatives, default_temperature, bind, state,
                         tuple(default_id_templates))
        SCORES.add(key, spec, override=override)
        return fn

    return deco


def score_spec(method: str) -> ScoreSpec:
    """The registered spec of ``method``; ``ValueError`` listing the registered methods otherwise."""
    if method not in SCORES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCORES.names())}")
    return SCORES.get(method)  # type: ignore[return-value]


def _cos(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Cosine similarities [N, C] of L2-normalised rows (float32)."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def _neglabel_bind(inputs: ScoreInputs) -> Callable[[Tensor], Tensor]:
    """NegLabel with the ID features normalised and the negatives permuted and grouped once (two matmuls a batch)."""
    id_unit = F.normalize(inputs.id_text_features.float(), dim=-1)
    neg, groups = prepare_negatives(inputs.neg_text_features, inputs.num_groups, inputs.seed)
    return lambda image_features: neglabel_score_prepared(image_features, id_unit, neg, groups, inputs.temperature)


def _ants_state(encoder: Any, id_labels: list[str], inputs: ScoreInputs) -> Any:
    """A fresh ANTS test-time state (clip_ood.ants) over these ID and negative features."""
    from clip_ood.ants import ANTSState

    return ANTSState(encoder, id_labels, inputs.id_text_features, inputs.neg_text_features,
                     temperature=inputs.temperature, num_groups=inputs.num_groups, seed=inputs.seed)


# ANTS: its base score is NegLabel; the test-time state adds the far (ENS) and near (VSNL) negatives
@register_score("ants", needs_negatives=True, bind=_neglabel_bind, state=_ants_state)
@register_score("neglabel", needs_negatives=True, bind=_neglabel_bind)
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

