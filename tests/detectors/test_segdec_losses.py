"""SegDecNet losses against hand-checked values: loss_weights, distance_weights, x8 downsampling, the total loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detectors.segdec import (
    distance_weights,
    downsample_mask,
    loss_weights,
    segdec_loss,
    segmentation_targets,
)


def test_loss_weights_dynamic_and_fixed():
    assert loss_weights(0, 10, 1.0) == (1.0, 0.0)  # epoch 0: lambda = 1 -> only the segmentation loss
    w_seg, w_dec = loss_weights(5, 10, 0.5)
    assert w_seg == pytest.approx(0.5) and w_dec == pytest.approx(0.25)
    w_seg, w_dec = loss_weights(9, 10, 2.0)
    assert w_seg == pytest.approx(0.1) and w_dec == pytest.approx(1.8)
    assert loss_weights(3, 10, 0.01, dynamic=False) == (1.0, 0.01)
    with pytest.raises(ValueError):
        loss_weights(1, 0, 1.0)
    with pytest.raises(ValueError):
        loss_weights(11, 10, 1.0)
    with pytest.raises(ValueError):
        loss_weights(1, 10, -1.0)


def test_distance_weights_hand_checked():
    mask = np.zeros((5, 5), np.uint8)
    mask[1:4, 1:4] = 1  # 3x3 block: EDT 1 on its border, 2 at its centre
    w = distance_weights(mask, p=2.0, w_pos=10.0)
    expected = np.ones((5, 5), np.float32)
    expected[1:4, 1:4] = 10.0 * (1 / 2) ** 2  # (EDT / max EDT)^p * w_pos = 2.5
    expected[2, 2] = 10.0
    np.testing.assert_allclose(w, expected)
    w1 = distance_weights(mask, p=1.0, w_pos=3.0)
    assert w1[2, 2] == pytest.approx(3.0) and w1[1, 1] == pytest.approx(1.5) and w1[0, 0] == 1.0
    # p = 0: every positive pixel gets w_pos
    assert set(np.unique(distance_weights(mask, p=0.0, w_pos=4.0)[1:4, 1:4]).tolist()) == {4.0}


def test_distance_weights_background_tensor_and_dilation():
    np.testing.assert_array_equal(distance_weights(np.zeros((6, 7)), 1.0, 10.0), np.ones((6, 7), np.float32))
    t = torch.zeros(1, 5, 5)
    t[0, 2, 2] = 1
    w = distance_weights(t, 1.0, 5.0)
    assert isinstance(w, torch.Tensor) and w.shape == (1, 5, 5) and float(w[0, 2, 2]) == 5.0
    # dilation 3 grows the single pixel into a 3x3 block first
    wd = distance_weights(t, 2.0, 10.0, dilate=3)
    assert float(wd[0, 2, 2]) == 10.0 and float(wd[0, 1, 1]) == pytest.approx(2.5) and float(wd[0, 0, 0]) == 1.0
    with pytest.raises(ValueError):
        distance_weights(np.zeros((2, 3, 4)), 1.0, 1.0)
    with pytest.raises(ValueError):
        distance_weights(np.zeros((4, 4)), 1.0, 0.0)


def test_downsample_reflection_pad_and_average_pool():
    rng = np.random.default_rng(0)
    x = rng.random((24, 32)).astype(np.float32)
    y = downsample_mask(x)
    assert y.shape == (3, 4)
    # reference: reflect-pad by 8, mean of each 17x17 window at stride 8
    padded = np.pad(x, 8, mode="reflect")
    ref = np.array([[padded[8 * i : 8 * i + 17, 8 * j : 8 * j + 17].mean() for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    np.testing.assert_allclose(downsample_mask(np.full((16, 16), 0.7)), np.full((2, 2), 0.7), rtol=1e-5)
    t = torch.from_numpy(x)[None, None].repeat(2, 1, 1, 1)
    assert downsample_mask(t).shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match="divisible"):
        downsample_mask(np.zeros((20, 16)))


def test_segmentation_targets():
    m = np.zeros((32, 32), np.float32)
    m[8:24, 8:24] = 1
    target, weight = segmentation_targets(m, weighted=True, p=1.0, w_pos=10.0)
    assert target.shape == weight.shape == (4, 4)
    # as the official code, output cell (i, j) averages the 17x17 window centred on pixel (8i, 8j)
    assert target[2, 2] == pytest.approx((16 / 17) ** 2, rel=1e-5) and target[0, 0] == pytest.approx((2 / 17) ** 2, rel=1e-5)  # reflection
    assert weight.max() > 1.0
    _, w_plain = segmentation_targets(m, weighted=False)
    np.testing.assert_allclose(w_plain, 1.0)


def test_segdec_loss_mixed_supervision():
    B = 3
    dec = torch.zeros(B)
    seg = torch.zeros(B, 1, 2, 2)
    label = torch.tensor([1.0, 0.0, 1.0])
    target = torch.rand(B, 1, 2, 2)
    weight = torch.ones(B, 1, 2, 2)
    segmented = torch.tensor([True, True, False])  # the third is image-level only
    out = segdec_loss(dec, seg, label, target, weight, segmented, w_seg=0.7, w_dec=0.3)
    ln2 = math.log(2.0)
    # zero logits: BCE = ln 2 for any target; mean over the batch of 0.7 * ln2 * [seg] + 0.3 * ln2
    assert float(out["loss"]) == pytest.approx((0.7 * ln2 * 2 + 0.3 * ln2 * 3) / 3, rel=1e-6)
    assert float(out["loss_dec"]) == pytest.approx(ln2, rel=1e-6)
    # the image-level-only sample's target does not matter
    seg2 = torch.randn(B, 1, 2, 2)
    a = segdec_loss(dec, seg2, label, target, weight, segmented, 1.0, 1.0)["loss"]
    t2 = target.clone()
    t2[2] = 1 - t2[2]
    b = segdec_loss(dec, seg2, label, t2, weight, segmented, 1.0, 1.0)["loss"]
    assert torch.allclose(a, b)
    # the weights scale the pixel losses
    w2 = weight.clone()
    w2[0] *= 10
    c = segdec_loss(dec, seg2, label, target, w2, segmented, 1.0, 0.0)["loss"]
    assert float(c) > float(segdec_loss(dec, seg2, label, target, weight, segmented, 1.0, 0.0)["loss"])
