"""The OOD score registry: ``SCORES``, ``register_score`` and what a registered score is (``ScoreSpec``) and takes
(``ScoreInputs``).

A score registers itself next to its code: the plain scores in ``clip_ood/scores.py``, NegLabel in
``clip_ood/neglabel.py``, ANTS in ``clip_ood/ants.py``. This module imports none of them; ``clip_ood.scores``
imports them all, so ``clip_ood.scores.SCORES`` lists every built-in method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from clip_ood.lexicon import ID_TEMPLATE
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
