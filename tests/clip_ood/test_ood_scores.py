"""Scores, metrics and negative-label selection against hand-checked values."""

import math

import pytest
import torch

from clip_ood.metrics import fpr_at_tpr, ood_metrics
from clip_ood.scores import energy_score, max_logit_score, mcm_score, neglabel_score


def _neglabel_reference(img, id_t, neg, temperature, num_groups, seed):
    """Literal reading of the spec: loop over groups, softmax over [ID | group], sum ID probs, average."""
    img = torch.nn.functional.normalize(img, dim=-1)
    id_t = torch.nn.functional.normalize(id_t, dim=-1)
    neg = torch.nn.functional.normalize(neg, dim=-1)
    m = neg.shape[0]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    k = m // num_groups
    neg = neg[perm][: k * num_groups]
    out = torch.zeros(img.shape[0])
    for g in range(num_groups):
        logits = torch.cat([img @ id_t.T, img @ neg[g * k : (g + 1) * k].T], dim=1) / temperature
        out += torch.softmax(logits, dim=1)[:, : id_t.shape[0]].sum(1)
    return out / num_groups


def test_neglabel_hand_value_one_group():
    img = torch.tensor([[2.0, 0.0]])  # normalised to [1, 0]
    id_t = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # cos 1 and 0
    s = neglabel_score(img, id_t, neg, temperature=1.0, num_groups=1)
    assert s.item() == pytest.approx(math.e / (2 * math.e + 1), abs=1e-6)  # 0.42232


def test_neglabel_hand_value_two_groups_drop_one():
    # image = e1; ID = e1; negatives e1, e2, -e1, e2, e1 (M=5, 2 groups -> one dropped after the permutation)
    img = torch.tensor([[1.0, 0.0]])
    id_t = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    cos = [1.0, 0.0, -1.0, 0.0, 1.0]
    groups = [[cos[perm[0]], cos[perm[1]]], [cos[perm[2]], cos[perm[3]]]]
    want = sum(math.e / (math.e + sum(math.exp(c) for c in g)) for g in groups) / 2
    got = neglabel_score(img, id_t, neg, temperature=1.0, num_groups=2, seed=0)
    assert got.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_neglabel_matches_literal_reference(seed):
    g = torch.Generator().manual_seed(1)
    img, id_t, neg = torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(103, 16, generator=g)
    got = neglabel_score(img, id_t, neg, temperature=0.01, num_groups=10, seed=seed)
    want = _neglabel_reference(img, id_t, neg, 0.01, 10, seed)
    assert torch.allclose(got, want, atol=1e-5)
    assert got.shape == (6,) and (got >= 0).all() and (got <= 1).all()


def test_neglabel_edge_cases():
    img, id_t = torch.randn(3, 8), torch.randn(2, 8)
    assert torch.allclose(neglabel_score(img, id_t, torch.zeros(0, 8)), torch.ones(3))
    # fewer negatives than groups: groups of one
    neg = torch.randn(4, 8)
    got = neglabel_score(img, id_t, neg, num_groups=100)
    assert torch.allclose(got, _neglabel_reference(img, id_t, neg, 0.01, 4, 0), atol=1e-5)


def test_mcm_energy_maxlogit_hand_values():
    img = torch.tensor([[1.0, 0.0]])
    id_t = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # cos 1 and 0
    assert mcm_score(img, id_t).item() == pytest.approx(math.e / (math.e + 1), abs=1e-6)
    assert mcm_score(img, id_t, temperature=0.5).item() == pytest.approx(math.exp(2) / (math.exp(2) + 1), abs=1e-6)
    assert energy_score(img, id_t).item() == pytest.approx(math.log(math.e + 1), abs=1e-6)
    assert max_logit_score(img, id_t).item() == pytest.approx(1.0)


def test_ood_metrics_hand_values():
    m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.1])
    assert m["auroc"] == pytest.approx(7 / 8)
    assert m["fpr95"] == pytest.approx(0.5)  # threshold 0.6 keeps all 4 ID (ceil(3.8)); 0.65 passes
    assert m["threshold95"] == pytest.approx(0.6)
    # AUPR-In: ID positive ranking 0.9,0.8,0.7,0.65(ood),0.6 -> precisions 1,1,1,4/5 at the 4 recalls
    assert m["aupr_in"] == pytest.approx((1 + 1 + 1 + 0.8) / 4)
    # AUPR-Out: OOD positive on -score: ranking 0.1(ood), 0.6, 0.65(ood) -> precisions 1, 2/3
    assert m["aupr_out"] == pytest.approx((1 + 2 / 3) / 2)


def test_fpr95_threshold_rule():
    ids = list(range(1, 21))  # keep ceil(19) = 19 highest -> threshold 2
    fpr, thr = fpr_at_tpr(ids, [0, 1.5, 2, 3])
    assert thr == 2 and fpr == pytest.approx(0.5)
    assert ood_metrics([1, 2, 3], [0, 0.5])["fpr95"] == 0.0
    with pytest.raises(ValueError):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError):
        ood_metrics([float("nan")], [1.0])
