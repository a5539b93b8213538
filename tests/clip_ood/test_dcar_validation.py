"""`retrieval train` validates on held-out pairs by default, scores the frozen model first (epoch 0), and keeps it
when no epoch beats it: prompt learning never ends below zero-shot on the validation pairs."""

from __future__ import annotations

import json

import pytest
import torch
from _repro import cli_ok

from clip_ood.dcar.data import Pair
from clip_ood.dcar.train import holdout_pairs


def test_holdout_pairs_keeps_images_whole_and_fixed():
    pairs = [Pair(f"im{i // 2}.png", f"caption {i}") for i in range(40)]  # 20 images, 2 captions each
    tr, va = holdout_pairs(pairs, 0.15)
    assert len({p.image for p in va}) == 3 and len(tr) + len(va) == 40
    assert {p.image for p in tr}.isdisjoint({p.image for p in va})
    assert holdout_pairs(pairs, 0.15)[1] == va  # the same pairs every time (not the run's seed)
    assert holdout_pairs(pairs, 0.0) == (pairs, [])
    assert holdout_pairs(pairs[:10], 0.5) == (pairs[:10], [])  # 5 images: too few to hold any out
    with pytest.raises(ValueError, match="validation share"):
        holdout_pairs(pairs, 1.0)


def test_the_frozen_model_competes_and_wins_when_training_does_not_help(tmp_path, tiny_model_dir, tiny_encoder,
                                                                       monkeypatch):
    import clip_ood.dcar.evaluate as train_mod  # train_retrieval imports evaluate_retrieval from it at call time

    real = train_mod.evaluate_retrieval
    d = tmp_path / "d"
    cli_ok("retrieval", "make-captions", "--out", d, "--n-train", "40", "--n-test", "4")
    base = ["retrieval", "train", "--model", f"local-dir:{tiny_model_dir}", "--data", d / "train.csv", "--batch", "8",
            "--device", "cpu", "--workers", "0", "--method", "coop", "--epochs", "2"]

    def frozen_is_better(m, ds, *a, **k):  # a model no epoch of which beats zero-shot
        r = real(m, ds, *a, **k)
        return {**r, "mean_recall": 50.0 if not m.enabled else 40.0}

    monkeypatch.setattr(train_mod, "evaluate_retrieval", frozen_is_better)
    out = cli_ok(*base, "--out", tmp_path / "r0")
    assert "the frozen model (zero-shot) scored best" in out
    rows = (tmp_path / "r0" / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("0,") and len(rows) == 4  # step 0 (frozen), then each epoch
    assert json.loads((tmp_path / "r0" / "summary.json").read_text())["best_step"] == 0
    assert json.loads((tmp_path / "r0" / "prompts.json").read_text())["enabled"] is False
    from clip_ood.dcar.train import load_prompts

    model = load_prompts(tmp_path / "r0", tiny_encoder.model, tiny_encoder.tokenizer)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model.enabled is False
        assert torch.allclose(model.encode_image(x).float(), tiny_encoder.model.encode_image(x).float(), atol=1e-6)

    # an epoch that beats the frozen model is kept, the prompts switched on
    monkeypatch.setattr(train_mod, "evaluate_retrieval", lambda m, ds, *a, **k: {
        **real(m, ds, *a, **k), "mean_recall": 40.0 if not m.enabled else 45.0})
    out = cli_ok(*base, "--out", tmp_path / "r1")
    assert "scored best" not in out
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["best_step"] > 0
    assert json.loads((tmp_path / "r1" / "prompts.json").read_text())["enabled"] is True
