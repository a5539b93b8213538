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
from clip_ood.lexicon import NegativeLabels, check_template


@dataclass
class ScoreResult:
    """Per-image outputs of one scoring call (all tensors on CPU, first dim = batch)."""

    scores: Tensor
    id_probs: Tensor  # [N, C]
    neg_sims: Tensor  # [N, k] cosines to the nearest negative labels
    neg_idx: Tensor  # [N, k]
    extra: dict[str, Tensor] = field(default_factory=dict)


class OODScorer:
    """Scores images with one method of ``clip_ood.scores.SCORES``; a method with a test-time state (ANTS) keeps
    it in ``self.state`` (see clip_ood.ants)."""

    def __init__(self, encoder: Any, id_labels: Sequence[str], method: str = "neglabel",
                 negatives: NegativeLabels | None = None, temperature: float | None = None,
                 num_groups: int = 100, seed: int = 0, id_templates: Sequence[str] | None = None,
                 cache_dir: str | Path | None = None, state: Any = None,
                 neg_templates: Sequence[str] | None = None) -> None:
        """Encode the ID classes and negatives once; ``ValueError`` for an unknown method or missing negatives.

        Args:
            encoder: a ``clip_ood.encoders.Encoder`` (``encode_image`` [B,3,H,W] -> [B,D], ``encode_text``,
                ``preprocess``), e.g. from ``load_encoder``.
            id_labels: the C in-distribution class names.
            method: a name registered in ``clip_ood.scores.SCORES`` (default "neglabel").
            negatives: mined negative labels (M of them); required by methods that need negatives.
            temperature: softmax temperature (default: the method's, 1.0 for mcm, else 0.01).
            num_groups: NegLabel negative groups (default 100).
            seed: seed of the negatives' permutation into groups (default 0).
            id_templates: prompt templates of the ID classes, features averaged (default: the method's, "The nice
                {}." for NegLabel / ANTS as in the NegLabel code, "a photo of a {}." for MCM / energy / max-logit).
            cache_dir: text-feature cache folder (default ``encoders.default_cache_dir()``; False: no cache).
            state: an existing test-time state to continue (default: a fresh one if the method has one).
            neg_templates: templates of the negative labels, features averaged (default: "The nice {}." for nouns,
                "This is a {} photo." for adjectives, as mined).
        """
        self.spec = S.score_spec(method)
        if self.spec.needs_negatives and (negatives is None or len(negatives) == 0):
            raise ValueError(f"method '{method}' needs negative labels (mine them with `negvision ood mine-labels`)")
        self.encoder = encoder
        self.id_labels = list(id_labels)
        self.method = method
        self.negatives = negatives or NegativeLabels([], [])
        self.temperature = temperature if temperature is not None else self.spec.default_temperature
        self.num_groups = num_groups
        self.seed = seed
        self.id_templates = tuple(id_templates) if id_templates else self.spec.default_id_templates
        self.neg_templates = tuple(neg_templates) if neg_templates else None
        for t in self.id_templates + (self.neg_templates or ()):
            check_template(t)
        self.id_features = encode_labels(encoder, self.id_labels, self.id_templates, cache_dir=cache_dir)
        if not len(self.negatives):
            self.neg_features = torch.zeros(0, self.id_features.shape[1])
        elif self.neg_templates:
            self.neg_features = encode_labels(encoder, self.negatives.words, self.neg_templates, cache_dir=cache_dir)
        else:
            self.neg_features = encode_labels(encoder, self.negatives.prompts, ("{}",), cache_dir=cache_dir)
        self.inputs = S.ScoreInputs(self.id_features, self.neg_features, self.temperature, num_groups, seed)
        self._score_batch = self.spec.batch_scorer(self.inputs)
        self.state = state  # the method's test-time state (ANTS: an ``ANTSState``), None for a stateless score
        if self.spec.state is not None and self.state is None:
            self.state = self.spec.state(encoder, self.id_labels, self.inputs)

    # ------------------------------------------------------------------ scoring
    def base_score(self, feats: Tensor) -> Tensor:
        """The method's score [N] of image features [N, D] (for a test-time method, its base score; no update)."""
        return self._score_batch(feats)

    def score_features(self, feats: Tensor, images: Sequence[Any] | None = None, top_neg: int = 5) -> ScoreResult:
        """Score image features [N, D]; ANTS also updates its state (``images`` go to an MLLM describer)."""
        feats = feats.float().cpu()
        extra: dict[str, Tensor] = {}
        if self.spec.state is not None:
            out = self.state.step(feats, images=images)
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

    def score_pixels(self, pixels: Tensor, images: Sequence[Any] | None = None, top_neg: int = 5) -> ScoreResult:
        """Score a batch already through ``encoder.preprocess`` ([B, 3, H, W]); ``images``: the PIL images, for a
        describer that looks at them (else None). Equals ``score_images`` on the same images."""
        feats = self.encoder.encode_image(pixels).float().cpu()
        return self.score_features(feats, images=images, top_neg=top_neg)

    def settings(self) -> dict[str, Any]:
        """What the scores depend on besides the model and labels (recorded in every output)."""
        return {"method": self.method, "temperature": self.temperature, "id_templates": list(self.id_templates),
                "neg_templates": list(self.neg_templates) if self.neg_templates else "noun/adj defaults",
                "num_groups": self.num_groups, "seed": self.seed}

    def describe(self, result: ScoreResult, i: int, top_k: int = 5) -> dict[str, Any]:
        """JSON-ready top ID classes and nearest negative labels of image ``i`` of ``result``."""
        k = min(top_k, len(self.id_labels))
        p, c = result.id_probs[i].topk(k)
        return {
            "top_classes": [{"label": self.id_labels[j], "prob": round(float(v), 6)} for v, j in zip(p.tolist(), c.tolist(), strict=False)],
            "nearest_negatives": [{"label": self.negatives.words[j], "similarity": round(float(v), 6)}
                                  for v, j in zip(result.neg_sims[i].tolist()[:top_k], result.neg_idx[i].tolist()[:top_k], strict=False)],
        }
