"""View-conditioned weights against threestudio's and stable-dreamfusion's published definitions."""

import math

import pytest
import torch

from diffusion.perpneg.views import (
    dreamfusion_weights,
    shifted_exponential_decay,
    threestudio_weights,
    view_conditioned_embeddings,
    view_prompts,
)


def f(a, b, c, r):
    return a * math.exp(-b * r) + c


def test_shifted_exponential_values():
    assert shifted_exponential_decay(4, 0.5, -2.426, 0.0) == pytest.approx(1.574)
    assert shifted_exponential_decay(4, 0.5, -2.426, 1.0) == pytest.approx(4 * math.exp(-0.5) - 2.426)
    assert shifted_exponential_decay(1, 0.5, 0.967, torch.tensor(0.0)).item() == pytest.approx(1.967)


@pytest.mark.parametrize("azi", [0.0, 30.0, -45.0, 89.0, 90.0, 135.0, -150.0, 180.0, 200.0])
def test_threestudio_schedule(azi):
    vw = threestudio_weights(10.0, azi)
    a = abs((azi + 180) % 360 - 180)
    if a < 90:
        r = 1 - a / 90
        assert vw.pos == pytest.approx({"front": r, "side": 1 - r})
        assert vw.neg_views == ("front", "side")
        assert vw.neg_w == pytest.approx((f(4, 0.5, -2.426, r), f(4, 0.5, -2.426, 1 - r)))
    else:
        r = 2 - a / 90
        assert vw.pos == pytest.approx({"side": r, "back": 1 - r})
        assert vw.neg_views == ("side", "front")
        assert vw.neg_w == pytest.approx((f(1, 0.5, -0.606, r), f(1, 0.5, 0.967, r)))
    assert min(vw.neg_w) >= 0  # the schedule's constants keep weights >= 0 on r in [0, 1]


def test_threestudio_key_views_and_overhead():
    front, side, back = threestudio_weights(0, 0), threestudio_weights(0, 90), threestudio_weights(0, 180)
    assert front.pos == {"front": 1.0, "side": 0.0}
    assert front.neg_w[1] == pytest.approx(1.574)  # at the front, the side prompt is pushed away
    assert side.pos == pytest.approx({"side": 1.0, "back": 0.0})
    assert back.neg_w == pytest.approx((1 - 0.606, 1 + 0.967))  # at the back: side 0.394, front 1.967
    top = threestudio_weights(61.0, 30.0)
    assert top.pos == {"overhead": 1.0} and top.neg_w == (0.0, 0.0)


@pytest.mark.parametrize("azi", [0.0, 10.0, 45.0, -70.0, 85.0, 90.0, 100.0, -120.0, 170.0, -180.0])
def test_dreamfusion_schedule(azi):
    nw, fd, sd = -2.0, 2.0, 10.0
    vw = dreamfusion_weights(azi)
    if -90 <= azi < 90:
        r = 1 - azi / 90 if azi >= 0 else 1 + azi / 90
        front = 0.0 if r > 0.8 else math.exp(-r * fd) * nw
        side = 0.0 if r < 0.2 else math.exp(-(1 - r) * sd) * nw
        assert vw.pos == pytest.approx({"front": r, "side": 1 - r})
        assert vw.neg_views == ("front", "side") and vw.neg_w == pytest.approx((-front, -side))
    else:
        r = 1 - (azi - 90) / 90 if azi >= 0 else 1 + (azi + 90) / 90
        side = 0.0 if r > 0.8 else math.exp(-r * sd) * nw / 2
        assert vw.pos == pytest.approx({"side": r, "back": 1 - r})
        assert vw.neg_views == ("side", "front") and vw.neg_w == pytest.approx((-side, 2.0))


def test_view_conditioned_embeddings_shapes_and_interpolation():
    emb = {v: torch.full((1, 5, 3), float(i)) for i, v in enumerate(["front", "side", "back", "overhead"])}
    pos, negs, w = view_conditioned_embeddings(emb, torch.tensor([0.0, 0.0, 80.0]), torch.tensor([45.0, 180.0, 0.0]))
    assert pos.shape == (3, 5, 3) and negs.shape == (2, 3, 5, 3) and w.shape == (2, 3)
    assert torch.allclose(pos[0], torch.full((5, 3), 0.5))  # halfway between front (0) and side (1)
    assert torch.allclose(pos[1], torch.full((5, 3), 2.0))  # back
    assert torch.allclose(pos[2], torch.full((5, 3), 3.0)) and torch.equal(w[:, 2], torch.zeros(2))  # overhead
    assert view_prompts("a corgi")["back"] == "a corgi, back view"
