"""SegDecNet: the paper's layers, shapes, the divisible-by-8 error, FeatureNorm and the gradient multiplier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detectors.segdec import FeatureNorm, SegDecNet, gradient_multiply
from detectors.segdec.model import XavierConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py


def _convs(seq: nn.Module) -> list[tuple[int, int, int]]:
    return [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in seq.modules() if isinstance(m, nn.Conv2d)]


def test_default_network_is_the_papers():
    m = SegDecNet()
    assert _convs(m.volume) == [(1, 32, 5), (32, 64, 5), (64, 64, 5), (64, 64, 5), (64, 64, 5), (64, 64, 5),
                                (64, 64, 5), (64, 64, 5), (64, 1024, 15)]
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.volume) == 3
    assert _convs(m.seg_mask) == [(1024, 1, 1)]
    assert _convs(m.extractor) == [(1025, 8, 5), (8, 16, 5), (16, 32, 5)]
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.extractor) == 3
    assert (m.fc.in_features, m.fc.out_features) == (66, 1)
    # every conv of the trunk and the decision net is followed by FeatureNorm and ReLU, convs have no bias
    for block in [*m.volume, *m.extractor]:
        if isinstance(block, nn.Sequential):
            assert isinstance(block[0], XavierConv2d) and block[0].bias is None
            assert isinstance(block[1], FeatureNorm) and isinstance(block[2], nn.ReLU)
    assert m.grad_multiplier == 0.0
    # state-dict names of the official implementation (its .pth files load into this network)
    keys = set(m.state_dict())
    for k in ("volume.0.0.weight", "volume.0.1.scale", "volume.0.1.bias", "volume.11.0.weight",
              "seg_mask.0.weight", "seg_mask.1.scale", "extractor.1.0.weight", "extractor.5.1.bias",
              "fc.weight", "fc.bias"):
        assert k in keys


@pytest.mark.parametrize("h,w,c", [(64, 64, 1), (32, 96, 3), (40, 24, 1)])
def test_shapes(h, w, c):
    torch.manual_seed(0)
    m = SegDecNet(in_channels=c, width=0.25 if (h, w) != (64, 64) else 1.0)
    dec, seg = m(torch.rand(2, c, h, w))
    assert dec.shape == (2,)
    assert seg.shape == (2, 1, h // 8, w // 8)
    assert torch.isfinite(dec).all() and torch.isfinite(seg).all()
    prob, seg_p = m.predict(torch.rand(1, c, h, w))
    assert prob.shape == (1,) and seg_p.shape == (1, 1, h, w)
    assert 0 <= float(prob) <= 1 and 0 <= float(seg_p.min()) and float(seg_p.max()) <= 1


@pytest.mark.parametrize("h,w", [(60, 64), (64, 30), (7, 8)])
def test_size_not_divisible_by_8_is_a_value_error(h, w):
    m = SegDecNet(width=0.25)
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.rand(1, 1, h, w))


def test_wrong_input_raises_value_error():
    m = SegDecNet(width=0.25)
    with pytest.raises(ValueError, match="input channel"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        m(torch.rand(1, 32, 32))
    with pytest.raises(ValueError):
        SegDecNet(in_channels=0)


def test_feature_norm_matches_official_formula_per_sample_per_channel():
    torch.manual_seed(0)
    fn = FeatureNorm(3)
    with torch.no_grad():
        fn.scale.copy_(torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1))
        fn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1))
    x = torch.randn(2, 3, 4, 5) * 3 + 1
    y = fn(x)
    for b in range(2):
        for c in range(3):
            v = x[b, c]
            ref = fn.scale[0, c, 0, 0] * (v - v.mean()) / torch.sqrt(v.std() + 1e-3) + fn.bias[0, c, 0, 0]
            assert torch.allclose(y[b, c], ref, atol=1e-5)
    # per sample: changing sample 1 leaves sample 0's output unchanged
    x2 = x.clone()
    x2[1] = x2[1] * 10 + 5
    assert torch.allclose(fn(x2)[0], y[0])
    # a 1x1 map is finite (biased std)
    assert torch.isfinite(fn(torch.randn(2, 3, 1, 1))).all()


def test_gradient_multiplier_function():
    x = torch.randn(4, requires_grad=True)
    y = gradient_multiply(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, 0.25 * torch.arange(4.0))
    x.grad = None
    gradient_multiply(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))


@pytest.mark.parametrize("multiplier", [0.0, 1.0])
def test_decision_loss_reaches_segmentation_net_only_with_multiplier(multiplier):
    torch.manual_seed(0)
    m = SegDecNet(width=0.25, grad_multiplier=multiplier)
    dec, _ = m(torch.rand(2, 1, 32, 32))
    dec.sum().backward()
    seg_grad = sum(float(p.grad.abs().sum()) for p in [*m.volume.parameters(), *m.seg_mask.parameters()]
                   if p.grad is not None)
    dec_grad = sum(float(p.grad.abs().sum()) for p in [*m.extractor.parameters(), *m.fc.parameters()])
    assert dec_grad > 0
    assert (seg_grad == 0) == (multiplier == 0)


def test_backbone_trunk_at_stride_8():
    torch.manual_seed(0)
    m = SegDecNet(in_channels=1, backbone="mobilenetv3_small_050")
    dec, seg = m(torch.rand(1, 1, 32, 48))
    assert dec.shape == (1,) and seg.shape == (1, 1, 4, 6)
    assert m.extractor[1][0].in_channels == m.volume_channels + 1
    assert m.config["backbone"] == "mobilenetv3_small_050"
