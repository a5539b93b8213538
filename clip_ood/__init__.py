"""Zero-shot OOD scoring with CLIP and negative labels (NegLabel, ANTS). Submodules are imported on use."""

__all__ = ["api", "ants", "cli", "describers", "encoders", "lexicon", "metrics", "neglabel", "plots", "score_registry",
           "scorer", "scores"]
