"""OODScorer: an encoder, ID class features and negative-label features, scoring batches of images or features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clip_ood import scores as S
from clip_ood.encoders import encode_labels, encode_pil
from clip_ood.lexicon import ID_TEMPLATE, NegativeLabels

METHODS = ("mcm", "neglabel", "ants", "energy", "max_logit")


@dataclass
class ScoreResult:
    """Per-image outputs of one scoring call (all tensors on CPU, first dim = batch)."""

    scores: Tensor
    id_probs: Tensor  # [N, C]
    neg_sims: Tensor  # [N, k] cosines to the nearest negative labels
    neg_idx: Tensor  # [N, k]
    extra: dict[str, Tensor] = field(default_factory=dict)


class OODScorer:
    """Scores images with one method; ``method='ants'`` keeps a test-time ANTSState (see clip_ood.ants)."""

    def __init__(self, encoder: Any, id_labels: Sequence[str], method: str = "neglabel",
                 negatives: NegativeLabels | None = None, temperature: float | None = None,
                 num_groups: int = 100, seed: int = 0, id_templates: Sequence[str] = (ID_TEMPLATE,),
                 cache_dir: str | Path | None = None, ants_state: Any = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("neglabel", "ants") and (negatives is None or len(negatives) == 0):
            raise ValueError(f"method '{method}' needs negative labels (mine them with `negvision ood mine-labels`)")
        self.encoder = encoder
        self.id_labels = list(id_labels)
        self.method = method
        self.negatives = negatives or NegativeLabels([], [])
        self.temperature = temperature if temperature is not None else (1.0 if method == "mcm" else 0.01)
        self.num_groups = num_groups
        self.seed = seed
        self.id_features = encode_labels(encoder, self.id_labels, id_templates, cache_dir=cache_dir)
        self.neg_features = (encode_labels(encoder, self.negatives.prompts, ("{}",), cache_dir=cache_dir)
                             if len(self.negatives) else torch.zeros(0, self.id_features.shape[1]))
        self._id_unit = torch.nn.functional.normalize(self.id_features.float(), dim=-1)
        self._neg_prepared, self._groups = S.prepare_negatives(self.neg_features, num_groups, seed)
        self.ants = ants_state
        if method == "ants" and self.ants is None:
            from clip_ood.ants import ANTSState

            self.ants = ANTSState(encoder, self.id_labels, self.id_features, self.neg_features,
                                  temperature=self.temperature, num_groups=num_groups, seed=seed)

    # ------------------------------------------------------------------ scoring
    def base_score(self, feats: Tensor) -> Tensor:
        if self.method in ("neglabel", "ants"):
            return S.neglabel_score_prepared(feats, self._id_unit, self._neg_prepared, self._groups, self.temperature)
        if self.method == "mcm":
            return S.mcm_score(feats, self.id_features, self.temperature)
        if self.method == "energy":
            return S.energy_score(feats, self.id_features, self.temperature)
        return S.max_logit_score(feats, self.id_features)

    def score_features(self, feats: Tensor, images: Sequence[Any] | None = None, top_neg: int = 5) -> ScoreResult:
        """Score image features [N, D]; ANTS also updates its state (``images`` go to an MLLM describer)."""
        feats = feats.float().cpu()
        extra: dict[str, Tensor] = {}
        if self.method == "ants":
            out = self.ants.step(feats, images=images)
            scores = out["score"]
            extra = {k: v for k, v in out.items() if k != "score"}
        else:
            scores = self.base_score(feats)
        probs = S.id_probabilities(feats, self.id_features, 0.01)
        sims, idx = S.nearest_labels(feats, self.neg_features, top_neg)
        return ScoreResult(scores.cpu(), probs.cpu(), sims.cpu(), idx.cpu(), extra)

    def score_images(self, images: Sequence[Any], top_neg: int = 5) -> ScoreResult:
        """Encode PIL images, then score them."""
        return self.score_features(encode_pil(self.encoder, images), images=images, top_neg=top_neg)

    def describe(self, result: ScoreResult, i: int, top_k: int = 5) -> dict[str, Any]:
        """JSON-ready top ID classes and nearest negative labels of image ``i`` of ``result``."""
        k = min(top_k, len(self.id_labels))
        p, c = result.id_probs[i].topk(k)
        return {
            "top_classes": [{"label": self.id_labels[j], "prob": round(float(v), 6)} for v, j in zip(p.tolist(), c.tolist(), strict=False)],
            "nearest_negatives": [{"label": self.negatives.words[j], "similarity": round(float(v), 6)}
                                  for v, j in zip(result.neg_sims[i].tolist()[:top_k], result.neg_idx[i].tolist()[:top_k], strict=False)],
        }
