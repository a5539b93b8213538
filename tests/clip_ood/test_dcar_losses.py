"""DCAR weighted contrastive loss against a hand-computed case."""

import math

import torch
import torch.nn.functional as F

from clip_ood.dcar.losses import (
    category_similarity,
    negative_weights,
    same_text_mask,
    weighted_contrastive_loss,
)


def test_hand_computed_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    w = torch.tensor([[9.0, 2.0], [3.0, 9.0]])  # diagonal ignored
    neg = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # s = 0 for both
    wn = torch.tensor([[0.5], [1.0]])
    out = weighted_contrastive_loss(img, txt, 1.0, w_batch=w, neg_txt=neg, w_neg=wn)
    e = math.exp
    i2t = (-math.log(e(1) / (e(1) + 2 * e(0.6) + 0.5)) - math.log(e(0.8) / (e(0.8) + 3 + 1))) / 2
    t2i = (-math.log(e(1) / (e(1) + 3)) - math.log(e(0.8) / (e(0.8) + 2 * e(0.6)))) / 2
    assert math.isclose(out["loss_i2t"].item(), i2t, rel_tol=1e-6)
    assert math.isclose(out["loss_t2i"].item(), t2i, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), (i2t + t2i) / 2, rel_tol=1e-6)


def test_unit_weights_equal_clip_infonce_and_zero_weight_drops():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(weighted_contrastive_loss(img, txt, 10.0)["loss"], ref)
    w = torch.ones(5, 5)
    w[0, 1] = 0.0
    drop = weighted_contrastive_loss(img, txt, 10.0, w_batch=w)["loss_i2t"]
    keep = [0, 2, 3, 4]
    row0 = -F.log_softmax(logits[0, keep], 0)[0]
    others = torch.stack([F.cross_entropy(logits[i : i + 1], torch.tensor([i])) for i in range(1, 5)])
    torch.testing.assert_close(drop, (row0 + others.sum()) / 5)


def test_category_weights_and_false_negative_mask():
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    m = category_similarity(feats)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    w = negative_weights(m, torch.tensor([0, 2, -1]), torch.tensor([1, 2]), alpha=0.5)
    torch.testing.assert_close(w, torch.tensor([[1.4, 1.0], [1.0, 1.5], [1.5, 1.5]]))
    mask = same_text_mask(["a", "b", "a"])
    assert mask.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
