"""Perp-Neg guidance math against hand-checked cases and the paper's equations."""

import pytest
import torch

from diffusion.perpneg import perp_neg_guidance, perpendicular_component
from diffusion.perpneg.guidance import perp_composition


def test_perpendicular_hand_checked():
    x = torch.tensor([[3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(perpendicular_component(x, y), torch.tensor([[0.0, 4.0]]))
    # x = 2y -> no perpendicular part; x perp y -> unchanged
    assert torch.allclose(perpendicular_component(2 * y, y), torch.zeros(1, 2))
    assert torch.allclose(perpendicular_component(torch.tensor([[0.0, 5.0]]), y), torch.tensor([[0.0, 5.0]]))


def test_perpendicular_is_orthogonal_per_sample():
    x, y = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = perpendicular_component(x, y)
    assert torch.allclose((p * y).flatten(1).sum(1), torch.zeros(3), atol=1e-4)
    # and x - p is parallel to y: projection coefficient recovered per sample
    coef = (x * y).flatten(1).sum(1) / (y * y).flatten(1).sum(1)
    assert torch.allclose(x - p, coef.view(-1, 1, 1, 1) * y, atol=1e-5)


def test_perpendicular_y_zero_returns_x():
    x = torch.randn(2, 3)
    assert torch.equal(perpendicular_component(x, torch.zeros(2, 3)), x)


def test_perpendicular_batch_equals_per_sample():
    x, y = torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6)
    y[2] *= 100  # very different scales must not leak across samples (the official code's bug)
    full = perpendicular_component(x, y)
    for i in range(4):
        assert torch.allclose(full[i : i + 1], perpendicular_component(x[i : i + 1], y[i : i + 1]), atol=1e-5)


def test_perpendicular_half_precision_no_overflow():
    x = (torch.randn(1, 4, 64, 64) * 60).half()
    y = (torch.randn(1, 4, 64, 64) * 60).half()
    p = perpendicular_component(x, y)
    assert p.dtype == torch.float16 and torch.isfinite(p).all()


def test_zero_weight_is_plain_cfg():
    u, c, n = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(3, 2, 4, 8, 8)
    out = perp_neg_guidance(u, c, n, [0.0, 0.0, 0.0], 7.5)
    assert torch.allclose(out, u + 7.5 * (c - u), atol=1e-5)
    assert torch.allclose(perp_neg_guidance(u, c, n[:0], [], 7.5), u + 7.5 * (c - u), atol=1e-5)


def test_hand_checked_two_dims():
    u = torch.zeros(1, 2)
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[1.0, 1.0]]])  # overlaps the positive along x
    # e_pos = (1, 0), perp(e_neg) = (0, 1) -> u + s * ((1, 0) - w (0, 1))
    out = perp_neg_guidance(u, pos, neg, [2.0], 3.0)
    assert torch.allclose(out, torch.tensor([[3.0, -6.0]]))
    # plain negative-prompt CFG would also remove the shared x component: s * (pos - neg) = (0, -3)
    assert out[0, 0] == 3.0


def test_formula_matches_paper_equation_random():
    u, c = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    n = torch.randn(2, 3, 4, 4, 4)
    w, s = torch.tensor([0.7, 1.3]), 5.0
    out = perp_neg_guidance(u, c, n, w, s)
    e_pos = c - u
    ref = []
    for b in range(3):  # per sample, as written in the paper (flattened vectors)
        ep = e_pos[b].flatten()
        acc = ep.clone()
        for k in range(2):
            ek = (n[k, b] - u[b]).flatten()
            acc -= w[k] * (ek - (ek @ ep) / (ep @ ep) * ep)
        ref.append(u[b].flatten() + s * acc)
    assert torch.allclose(out.flatten(1), torch.stack(ref), atol=1e-4)


def test_batch_equals_per_sample_and_per_sample_weights():
    u, c, n = torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6), torch.randn(2, 4, 4, 6, 6)
    w = torch.rand(2, 4)
    full = perp_neg_guidance(u, c, n, w, 7.0)
    for i in range(4):
        one = perp_neg_guidance(u[i : i + 1], c[i : i + 1], n[:, i : i + 1], w[:, i], 7.0)
        assert torch.allclose(full[i : i + 1], one, atol=1e-5)


def test_result_removes_only_perpendicular_part():
    u, c, n = torch.randn(2, 16), torch.randn(2, 16), torch.randn(1, 2, 16)
    out = perp_neg_guidance(u, c, n, [1.0], 1.0)
    e_pos = c - u
    # the component of (out - u) along e_pos is exactly e_pos (the main concept is untouched)
    along = ((out - u) * e_pos).sum(1) / (e_pos * e_pos).sum(1)
    assert torch.allclose(along, torch.ones(2), atol=1e-5)


def test_multi_positive_composition():
    u = torch.zeros(1, 3)
    main = torch.tensor([[1.0, 0.0, 0.0]])
    others = torch.tensor([[[1.0, 2.0, 0.0]], [[0.0, 0.0, 1.0]]])
    out = perp_composition(u, main, others, [0.5, -1.0], 2.0)  # +0.5 * (0, 2, 0) - 1.0 * (0, 0, 1)
    assert torch.allclose(out, torch.tensor([[2.0, 2.0, -2.0]]))


def test_rejects_negative_weights_and_bad_shapes():
    u = torch.randn(2, 3)
    with pytest.raises(ValueError):
        perp_neg_guidance(u, u, u[None], [-1.0], 1.0)
    with pytest.raises(ValueError):
        perp_neg_guidance(u, u, u[None], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError):
        perpendicular_component(u, torch.randn(3, 3))
