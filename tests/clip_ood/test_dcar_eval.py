"""Retrieval metrics: R@K both directions with duplicate captions."""

import torch

from clip_ood.dcar.evaluate import format_table, ground_truth, recall_at_k


def test_recall_hand_case():
    texts, gt = ground_truth(["a", "b", "a"])
    assert texts == ["a", "b"] and gt.tolist() == [[True, False], [False, True], [True, False]]
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7]])
    r = recall_at_k(sim, gt, ks=(1, 2))
    assert abs(r["i2t_R@1"] - 100 / 3) < 1e-4 and r["i2t_R@2"] == 100.0
    # text "a": best image 0 (a) -> hit; text "b": best image 2 (a) -> miss, then image 1 at rank 2
    assert r["t2i_R@1"] == 50.0 and r["t2i_R@2"] == 100.0
    assert "image->text" in format_table({"x": recall_at_k(sim, gt)})
