"""ATSS assignment: hand-checked cases and agreement with a transcription of the official code."""

import math
import statistics

import pytest
import torch

from detectors.atss import atss_assign
from detectors.atss.assigner import atss_assign_dense, atss_assign_loop


def line_anchors(xs, half=1.0):
    """Square anchors of side 2*half centred at (x, 0)."""
    xs = torch.tensor(xs, dtype=torch.float32)
    return torch.stack([xs - half, torch.full_like(xs, -half), xs + half, torch.full_like(xs, half)], 1)


def iou_1d(a, b):
    """IoU of two boxes that share the y-extent [-1, 1] (heights 2)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0])) * 2
    ua = (a[1] - a[0]) * 2 + (b[1] - b[0]) * 2 - inter
    return inter / ua


def test_hand_checked_single_positive():
    anchors = line_anchors([0, 1, 2, 3, 4])
    gt = torch.tensor([[0.5, -1.0, 1.9, 1.0]])
    # centre 1.2: distances 1.2, 0.2, 0.8, 1.8, 2.8 -> candidates {1, 2, 0} for k = 3
    ious = [iou_1d((x - 1, x + 1), (0.5, 1.9)) for x in (0, 1, 2)]
    assert ious == pytest.approx([1 / 5.8, 0.7, 0.36])
    thr = statistics.mean(ious) + statistics.stdev(ious)  # unbiased std
    assert thr == pytest.approx(0.678242, abs=1e-5)
    out = atss_assign(anchors, [5], gt, topk=3)
    assert out.tolist() == [-1, 0, -1, -1, -1]  # only anchor 1 (IoU 0.7 >= 0.678) is positive


def test_no_positive_and_issue90_option():
    anchors = line_anchors([0, 1, 2, 3, 4])
    gt = torch.tensor([[0.5, -1.0, 2.5, 1.0]])
    # candidates {1, 2} (d = 0.5) and the tie at d = 1.5 between anchors 0 and 3 -> the lower index, 0
    # IoUs 1/7, 0.6, 0.6 -> threshold 0.7116 > 0.6: no positive at all
    assert atss_assign(anchors, [5], gt, topk=3).tolist() == [-1] * 5
    # ATSS issue #90 option: the max-IoU candidate (first of the tie 1, 2) becomes positive
    assert atss_assign(anchors, [5], gt, topk=3, assign_unmatched_gt=True).tolist() == [-1, 0, -1, -1, -1]


def test_candidate_ties_take_lower_index():
    anchors = line_anchors([0, 1, 2, 3, 4])
    gt = torch.tensor([[0.5, -1.0, 2.5, 1.0]])
    from detectors.atss.assigner import nearest_k

    c = (anchors[:, 0] + anchors[:, 2]) / 2
    d = (c - 1.5).abs()[None, :]  # [G=1, n=5]
    assert nearest_k(d, 3)[0].tolist() == [0, 1, 2]  # the tie at 1.5 (anchors 0 and 3) -> 0
    assert nearest_k(d, 1)[0].tolist() == [1]  # the tie at 0.5 (anchors 1 and 2) -> 1
    assert nearest_k(d, 2)[0].tolist() == [1, 2]
    # many rows, mixed: rows with all ties taken and rows with a partial tie
    dd = torch.tensor([[1.0, 0.0, 1.0, 1.0, 2.0], [0.0, 0.0, 3.0, 1.0, 1.0]])
    assert nearest_k(dd, 2).tolist() == [[0, 1], [0, 1]]
    assert nearest_k(dd, 4).tolist() == [[0, 1, 2, 3], [0, 1, 3, 4]]
    assert gt.shape == (1, 4)


def test_gt_without_anchor_centre_inside():
    anchors = line_anchors([0, 1, 2, 3, 4])
    gt = torch.tensor([[1.2, -1.0, 1.8, 1.0]])  # no anchor centre (integers) lies inside
    assert atss_assign(anchors, [5], gt, topk=3).tolist() == [-1] * 5
    # even with the issue-90 option the best candidate is given (centre test is skipped for it)
    out = atss_assign(anchors, [5], gt, topk=3, assign_unmatched_gt=True)
    assert (out >= 0).sum() == 1


def test_centre_margin_is_strict():
    # two identical near anchors (centre x = 0.5) and four far ones: threshold 0.85 * IoU_near < IoU_near
    anchors = line_anchors([0.5, 0.5, 10, 11, 12, 13], half=1.0)
    # the near anchors' centre lies exactly 0.01 inside the left edge 0.49: excluded (> 0.01 required)
    gt = torch.tensor([[0.49, -1.0, 2.0, 1.0]])
    assert atss_assign(anchors, [6], gt, topk=6).tolist() == [-1] * 6
    gt2 = torch.tensor([[0.48, -1.0, 2.0, 1.0]])
    assert atss_assign(anchors, [6], gt2, topk=6).tolist() == [0, 0, -1, -1, -1, -1]


def test_no_gt_all_background():
    anchors = line_anchors([0, 1, 2])
    out = atss_assign(anchors, [3], torch.zeros(0, 4))
    assert out.tolist() == [-1, -1, -1] and out.dtype == torch.long


def test_anchor_shared_by_two_gts_goes_to_highest_iou():
    anchors = line_anchors([0, 1, 2, 3, 4])
    g_small = [0.6, -1.0, 1.4, 1.0]  # IoU with anchor 1 = 0.8*2/4 = 0.4
    g_big = [0.1, -1.0, 1.9, 1.0]  # IoU with anchor 1 = 1.8*2/4 = 0.9
    out = atss_assign(anchors, [5], torch.tensor([g_small, g_big]), topk=1)
    # k = 1: each gt's only candidate is anchor 1 (std of one value is nan -> threshold nan -> no positive)
    assert out.tolist() == [-1] * 5
    two_levels = torch.cat([anchors, line_anchors([1.0], half=1.0)])
    out = atss_assign(two_levels, [5, 1], torch.tensor([g_small, g_big]), topk=1)
    # candidates per gt: anchor 1 and anchor 5 (identical boxes) -> std 0 -> both positive for both gts
    assert out.tolist() == [-1, 1, -1, -1, -1, 1]
    # equal IoUs: the lower gt index wins
    out = atss_assign(two_levels, [5, 1], torch.tensor([g_big, g_big]), topk=1)
    assert out.tolist() == [-1, 0, -1, -1, -1, 0]


def test_topk_times_anchors_per_location_and_small_levels():
    # two anchors per location (k = topk * 2), a level smaller than k takes all its anchors
    xs = [0, 0, 1, 1, 2, 2, 3, 3]
    a = line_anchors(xs)
    a[1::2] = line_anchors(xs[1::2], half=1.5)
    coarse = line_anchors([1.5], half=3)
    anchors = torch.cat([a, coarse])
    gt = torch.tensor([[0.2, -1.2, 2.8, 1.2]])
    ours = atss_assign(anchors, [8, 1], gt, topk=2, num_anchors_per_location=2)
    ref = atss_assign_dense(anchors, [8, 1], gt, topk=2, num_anchors_per_location=2)
    assert torch.equal(ours, ref)


def random_layout(seed, G):
    g = torch.Generator().manual_seed(seed)
    levels, anchors = [], []
    for s in (8, 16, 32):
        n = int(torch.randint(20, 60, (1,), generator=g))
        c = torch.rand(n, 2, generator=g) * 200
        half = 4 * s * (0.5 + torch.rand(n, 1, generator=g))
        anchors.append(torch.cat([c - half, c + half], 1))
        levels.append(n)
    xy = torch.rand(G, 2, generator=g) * 180
    wh = torch.rand(G, 2, generator=g) * 120 + 2
    return torch.cat(anchors), levels, torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("G", [1, 3, 17])
def test_matches_official_transcription_and_loop(seed, G):
    anchors, levels, gt = random_layout(seed, G)
    ours = atss_assign(anchors, levels, gt, topk=9)
    assert torch.equal(ours, atss_assign_dense(anchors, levels, gt, topk=9))
    assert torch.equal(ours, atss_assign_loop(anchors, levels, gt, topk=9))
    # chunking over gts changes nothing
    assert torch.equal(ours, atss_assign(anchors, levels, gt, topk=9, max_elements=len(anchors)))


def test_bad_shapes():
    with pytest.raises(ValueError, match="sums to"):
        atss_assign(line_anchors([0, 1]), [3], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(line_anchors([0, 1]), [2], torch.zeros(4))


def test_thousand_gts_on_coco_layout_is_memory_bounded():
    """1,000 gts on an 800x1333 P3-P7 layout (mmdetection issue #1581) runs with bounded blocks."""
    anchors, levels = [], []
    for s in (8, 16, 32, 64, 128):
        h, w = math.ceil(800 / s), math.ceil(1333 / s)
        ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        c = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        anchors.append(torch.cat([c - 4 * s, c + 4 * s], 1))
        levels.append(h * w)
    anchors = torch.cat(anchors)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1000, 2, generator=g) * torch.tensor([1250.0, 720.0])
    gt = torch.cat([xy, xy + torch.rand(1000, 2, generator=g) * 80 + 4], 1)
    out = atss_assign(anchors, levels, gt, max_elements=1 << 22)
    assert out.shape == (anchors.shape[0],)
    assert (out >= 0).sum() > 1000
    assert out.max() < 1000


@pytest.mark.parametrize("seed", range(4))
def test_regular_grid_with_many_distance_ties_matches_loop(seed):
    """On a regular anchor grid with integer gt boxes, equal centre distances are everywhere: both
    implementations break them towards the lower anchor index."""
    anchors, levels = [], []
    for s in (8, 16, 32):
        h = w = 128 // s
        ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        c = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        anchors.append(torch.cat([c - 4 * s, c + 4 * s], 1))
        levels.append(h * w)
    anchors = torch.cat(anchors)
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 100, (12, 2), generator=g).float()
    gt = torch.cat([xy, xy + torch.randint(4, 40, (12, 2), generator=g).float()], 1)
    assert torch.equal(atss_assign(anchors, levels, gt), atss_assign_loop(anchors, levels, gt))
    assert torch.equal(atss_assign(anchors, levels, gt), atss_assign(anchors, levels, gt, max_elements=64))
