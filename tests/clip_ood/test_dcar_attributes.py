"""DCAR attribute weights: the MI estimator, the weight update, the attribute loss."""

import math

import torch

from clip_ood.dcar.attributes import (
    attribute_labels,
    attribute_loss,
    ema_update,
    mi_weights,
    mutual_information,
)


def test_mutual_information_hand_cases():
    s = torch.tensor([0.0, 0.1, 0.9, 1.0])
    assert math.isclose(mutual_information(s, torch.tensor([0, 0, 1, 1]), 2), 1.0, rel_tol=1e-9)
    assert math.isclose(mutual_information(s, torch.tensor([0, 0, 1, 1]), 2, normalized=False), math.log(2))
    assert mutual_information(s, torch.tensor([0, 1, 0, 1]), 2) == 0.0  # independent of the bins
    assert mutual_information(s, torch.tensor([1, 1, 1, 1]), 2) == 0.0  # constant attribute
    # 2 bins {0.0, 0.1} | {0.9, 1.0}; labels 0,1 | 1,1: p(z=1,b=0)=1/4 ...
    z = torch.tensor([0, 1, 1, 1])
    p = {(0, 0): 0.25, (1, 0): 0.25, (1, 1): 0.5}
    pz, pb = {0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.5}
    mi = sum(v * math.log(v / (pz[a] * pb[b])) for (a, b), v in p.items())
    hz = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(mutual_information(s, z, 2), mi / hz, rel_tol=1e-9)


def test_weights_favour_informative_attribute_and_ema():
    g = torch.Generator().manual_seed(0)
    n = 200
    img = torch.randn(n, 4, generator=g)
    labels = torch.zeros(n, 2, dtype=torch.bool)
    labels[:, 0] = img[:, 0] > 0  # attribute 0 is visible along image axis 0
    labels[:, 1] = torch.rand(n, generator=g) > 0.5  # attribute 1: unrelated to the images
    attr = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    nmi, w = mi_weights(img, attr, labels, tau=0.25)
    assert nmi[0] > 0.5 > 0.1 > nmi[1]
    assert w[0] > 1 > w[1] and math.isclose(float(w.sum()), 2.0, rel_tol=1e-6)
    torch.testing.assert_close(ema_update(torch.ones(2), w, 0.5), 0.5 + 0.5 * w)


def test_attribute_loss_hand_case():
    img = torch.tensor([[1.0, 0.0]])
    attr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = attribute_labels([["a", "b"]], ["a", "b", "c"])
    assert labels.tolist() == [[True, True, False]]
    w = torch.tensor([2.0, 1.0, 5.0])
    got = attribute_loss(img, attr, labels, w, 1.0)
    e = math.exp
    la = -math.log(e(1) / (e(1) + e(-1)))
    lb = -math.log(e(0) / (e(0) + e(-1)))
    assert math.isclose(got.item(), (2 * la + 1 * lb) / 3, rel_tol=1e-6)
