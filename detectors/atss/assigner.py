"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020), official sfzhang15/ATSS semantics.

For each ground truth g:
  C_g   = union over FPN levels of the k = min(topk * anchors_per_location, anchors in level) anchors whose
          centres are nearest (L2) to the centre of g                                   (Alg. 1, lines 3-6)
  t_g   = mean(IoU(C_g, g)) + std(IoU(C_g, g))          (unbiased std, as torch.std)    (Alg. 1, lines 7-10)
  P_g   = {a in C_g : IoU(a, g) >= t_g and centre(a) inside g with min(l, t, r, b) > 0.01} (Alg. 1, lines 11-15)
An anchor positive for several gts goes to the gt with the highest IoU (ties: the lowest gt index).
Deterministic tie-breaking of equal centre distances: the lower anchor index is taken first.
IoU is torchvision's ``box_iou`` (continuous coordinates; the official code adds +1 to widths, a legacy of
maskrcnn-benchmark's pixel convention).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["atss_assign", "atss_assign_dense", "atss_assign_loop"]


def nearest_k(dist: Tensor, k: int) -> Tensor:
    """Indices [G, k] of the k smallest entries of each row of ``dist`` [G, n]; equal values -> lower index first."""
    g, n = dist.shape
    if k >= n:
        return torch.arange(n, device=dist.device).expand(g, n)
    # one more than needed: a row's choice is ambiguous only if the (k+1)-th smallest equals the k-th
    vals, idx = dist.topk(k + 1, dim=1, largest=False, sorted=True)
    kth = vals[:, k - 1:k]  # [G, 1] the k-th smallest distance
    idx = idx[:, :k]
    # topk's choice among values equal to the k-th is unspecified: redo those rows deterministically
    # (the lowest anchor indices among the ties)
    rows = torch.nonzero(vals[:, k] == vals[:, k - 1]).squeeze(1)
    if rows.numel():
        d, kr = dist[rows], kth[rows]
        below = d < kr
        need = k - torch.count_nonzero(below, dim=1)
        t = d == kr
        take = below | (t & (t.cumsum(1, dtype=torch.int32) <= need[:, None]))
        idx = idx.clone()
        idx[rows] = torch.nonzero(take)[:, 1].view(-1, k)
    return idx.sort(dim=1).values


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of boxes a [..., 4] and b [..., 4] (same formula as torchvision's ``box_iou``)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a + area_b - inter)


def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    num_anchors_per_location: int = 1,
    *,
    assign_unmatched_gt: bool = False,
    max_elements: int = 1 << 22,
    return_ious: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """ATSS: for each anchor the index of its gt (-1 = background).

    anchors [A, 4] xyxy (levels concatenated in order), gt_boxes [G, 4] xyxy. ``assign_unmatched_gt`` (off by
    default, ATSS issue #90) gives a gt with no positive its highest-IoU candidate. Work is chunked over gts so
    that no gt x level-anchors block exceeds ``max_elements`` entries (memory-bounded for thousands of gts); IoUs
    are computed for the candidates only.
    ``return_ious`` also returns each anchor's IoU with its assigned gt (-inf for background).
    """
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [G, 4], got {tuple(gt_boxes.shape)}")
    num_anchors_per_level = [int(n) for n in num_anchors_per_level]
    A, G = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_anchors_per_level) != A:
        raise ValueError(f"num_anchors_per_level sums to {sum(num_anchors_per_level)} but there are {A} anchors")
    device = anchors.device
    assigned = torch.full((A,), -1, dtype=torch.long, device=device)
    best_iou = torch.full((A,), float("-inf"), dtype=torch.float32, device=device)
    if G == 0 or A == 0:
        return (assigned, best_iou) if return_ious else assigned

    anchors = anchors.float()
    gt_boxes = gt_boxes.to(device=device, dtype=torch.float32)
    acx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    acy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    anchor_points = torch.stack((acx, acy), dim=1)  # [A, 2]
    k_per_level = [min(topk * num_anchors_per_location, n) for n in num_anchors_per_level]
    starts = [0]
    for n in num_anchors_per_level[:-1]:
        starts.append(starts[-1] + n)

    n_max = max(num_anchors_per_level)
    chunk = max(1, min(G, max_elements // max(n_max, 1)))
    for g0 in range(0, G, chunk):
        gts = gt_boxes[g0:g0 + chunk]  # [g, 4]
        g = gts.shape[0]
        gt_points = torch.stack(((gts[:, 0] + gts[:, 2]) / 2.0, (gts[:, 1] + gts[:, 3]) / 2.0), dim=1)
        # candidates: the k nearest anchor centres per level (Alg. 1, lines 3-6); L2 as the official code
        cands = []
        for start, n, k in zip(starts, num_anchors_per_level, k_per_level, strict=True):
            if n == 0:
                continue
            d = torch.cdist(gt_points, anchor_points[start:start + n], compute_mode="donot_use_mm_for_euclid_dist")
            cands.append(nearest_k(d, k) + start)  # [g, k]
            del d
        cand = torch.cat(cands, dim=1)  # [g, K] anchor indices
        cand_ious = _pairwise_iou(anchors[cand], gts[:, None, :])  # [g, K]
        # t_g = m_g + v_g (Alg. 1, lines 7-10)
        with warnings.catch_warnings():  # a single candidate has std nan -> no positive, as in the official code
            warnings.simplefilter("ignore", UserWarning)
            thresh = cand_ious.mean(1, keepdim=True) + cand_ious.std(1, keepdim=True)
        is_pos = cand_ious >= thresh
        # centre of the positive inside the gt (Alg. 1, line 12)
        cx, cy = acx[cand], acy[cand]
        l = cx - gts[:, 0:1]
        t = cy - gts[:, 1:2]
        r = gts[:, 2:3] - cx
        b = gts[:, 3:4] - cy
        inside = torch.stack((l, t, r, b), dim=0).min(dim=0).values > 0.01
        is_pos &= inside
        if assign_unmatched_gt:
            none = ~is_pos.any(1)  # gts without any positive
            if none.any():
                rows = torch.nonzero(none).squeeze(1)
                is_pos[rows, cand_ious[rows].argmax(1)] = True
        # resolve anchors positive for several gts: highest IoU, then lowest gt index
        grow = torch.arange(g, device=device)[:, None].expand_as(cand)
        pa = cand[is_pos]  # anchor index of each positive pair
        pg = grow[is_pos] + g0  # gt index
        pv = cand_ious[is_pos]
        if pa.numel() == 0:
            continue
        chunk_best = torch.full((A,), float("-inf"), device=device)
        chunk_best.scatter_reduce_(0, pa, pv, reduce="amax")
        winners = pv == chunk_best[pa]
        chunk_gt = torch.full((A,), G, dtype=torch.long, device=device)
        chunk_gt.scatter_reduce_(0, pa[winners], pg[winners], reduce="amin")
        better = chunk_best > best_iou  # strict: earlier chunks hold lower gt indices and win ties
        best_iou = torch.where(better, chunk_best, best_iou)
        assigned = torch.where(better, chunk_gt, assigned)
    return (assigned, best_iou) if return_ious else assigned


def atss_assign_loop(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9, num_anchors_per_location: int = 1
) -> Tensor:
    """Plain per-gt loop implementation of the same rule (reference for tests and the benchmark)."""
    A, G = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((A,), -1, dtype=torch.long)
    best = torch.full((A,), float("-inf"))
    if G == 0:
        return assigned
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    for gi in range(G):
        gt = gt_boxes[gi]
        gc = (gt[:2] + gt[2:]) / 2.0
        cand = []
        start = 0
        for n in num_anchors_per_level:
            k = min(topk * num_anchors_per_location, n)
            d = (centers[start:start + n] - gc).pow(2).sum(-1).sqrt()
            order = torch.sort(d, stable=True).indices[:k]
            cand.append(order + start)
            start += n
        c = torch.cat(cand)
        iou = box_iou(anchors[c], gt[None])[:, 0]
        thr = iou.mean() + iou.std()
        cx, cy = centers[c, 0], centers[c, 1]
        inside = torch.stack((cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy)).min(0).values > 0.01
        pos = (iou >= thr) & inside
        for a, v in zip(c[pos].tolist(), iou[pos].tolist(), strict=True):
            if v > best[a]:
                best[a] = v
                assigned[a] = gi
    return assigned


def atss_assign_dense(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9, num_anchors_per_location: int = 1
) -> Tensor:
    """Transcription of the official ``prepare_targets`` (full A x G IoU and distance matrices, ``torch.topk``).

    The memory profile of the official / mmdetection assigners; kept as a reference for tests and benchmarks.
    Equal centre distances are left to ``torch.topk`` (unspecified order), as in the official code.
    """
    A, G = anchors.shape[0], gt_boxes.shape[0]
    if G == 0:
        return torch.full((A,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    gt_points = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2), 1)
    acx = (anchors[:, 0] + anchors[:, 2]) / 2
    acy = (anchors[:, 1] + anchors[:, 3]) / 2
    distances = (torch.stack((acx, acy), 1)[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]
    cand, start = [], 0
    for n in num_anchors_per_level:
        k = min(topk * num_anchors_per_location, n)
        _, idx = distances[start:start + n].topk(k, dim=0, largest=False)
        cand.append(idx + start)
        start += n
    cand = torch.cat(cand, 0)  # [K, G]
    cols = torch.arange(G, device=anchors.device)
    cand_ious = ious[cand, cols]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        thresh = cand_ious.mean(0) + cand_ious.std(0)
    cx, cy = acx[cand], acy[cand]
    inside = torch.stack((cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy)).min(0).values > 0.01
    is_pos = (cand_ious >= thresh[None, :]) & inside
    ious_inf = torch.full_like(ious, float("-inf"))
    ious_inf[cand[is_pos], cols.expand_as(cand)[is_pos]] = cand_ious[is_pos]
    val, idx = ious_inf.max(1)  # ties: the first (lowest) gt index
    idx[val == float("-inf")] = -1
    return idx
