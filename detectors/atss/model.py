"""The ATSS detector with torchvision's detection API (list of images in 0..1 -> losses or detections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import (
    batched_nms,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    remove_small_boxes,
    sigmoid_focal_loss,
)

from detectors.atss.assigner import atss_assign
from detectors.atss.box_coder import BoxCoder
from detectors.atss.head import ATSSHead
from detectors.registry import DETECTORS
from vision.backbones import Backbone, build_fpn, create_backbone

STRIDES = (8, 16, 32, 64, 128)


def grid_anchors(feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], sizes: Sequence[float],
                 device: torch.device | None = None) -> Tensor:
    """One square anchor of side ``size`` per location, centred at (x * stride, y * stride); levels concatenated."""
    out = []
    for (h, w), s, size in zip(feature_sizes, strides, sizes, strict=True):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s
        xs = torch.arange(w, device=device, dtype=torch.float32) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        c = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=1)
        half = size / 2.0
        out.append(torch.cat((c - half, c + half), dim=1))
    return torch.cat(out, dim=0)


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of anchor centres inside their gt boxes (FCOS eq. 3)."""
    l = points[:, 0] - boxes[:, 0]
    t = points[:, 1] - boxes[:, 1]
    r = boxes[:, 2] - points[:, 0]
    b = boxes[:, 3] - points[:, 1]
    lr = torch.stack((l, r), 1)
    tb = torch.stack((t, b), 1)
    c = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return torch.sqrt(c.clamp(min=0))


def _mean_over_gpus(x: Tensor) -> Tensor:
    """Sum over processes divided by the number of processes (the official num_pos_avg_per_gpu)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class ATSS(nn.Module):
    """ATSS detector (Zhang et al., CVPR 2020): backbone + FPN P3-P7 + ATSS head, ATSS sample selection.

    Takes its parts like torchvision's ``FCOS(backbone, num_classes, ...)``: ``backbone`` may be a registry name or
    a module. Inputs are a list of [3, H, W] images in 0..1; see ``forward``.

    Args:
        num_classes: number of object classes (labels 0..num_classes-1; no background class).
        backbone: a backbone registry / timm name, or an ``nn.Module`` whose forward returns the C3, C4, C5 feature
            maps (strides 8, 16, 32) and which has ``out_channels`` (3 ints), ``strides`` (8, 16, 32) and the input
            normalisation ``mean`` / ``std`` (3 floats each; a registry backbone carries them).
        pretrained_backbone: with a name: True (the registry's weights), False, or a weights file.
        fpn_channels: channels of the FPN levels P3-P7 and of the head.
        num_convs: conv3x3-GN-ReLU layers in each head tower (4 in the paper).
        min_size, max_size: resize of the inputs (torchvision's GeneralizedRCNNTransform).
        anchor_scale: anchor side = anchor_scale x stride (8 in the paper: one square anchor per location).
        topk: candidates per level and gt for the adaptive IoU threshold (9 in the paper).
        prior_prob: initial foreground probability of the classification bias (0.01).
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
        reg_loss_weight: weight of the GIoU loss (2).
        score_thresh, nms_thresh, pre_nms_top_n, detections_per_img: inference filtering (0.05, 0.6, 1000, 100).
        assign_unmatched_gt: give a gt without any positive its best candidate (off, as the paper).
        freeze_bn: freeze the backbone's BatchNorm (default: when pretrained weights are loaded).
        size_divisible: padding multiple of the batched input (32).
        norm_groups: GroupNorm groups in the head (32).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | nn.Module = "efficientnet_lite0.offline",
        pretrained_backbone: bool | str = False,
        fpn_channels: int = 256,
        num_convs: int = 4,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        anchor_scale: float = 8.0,
        topk: int = 9,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 2.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        assign_unmatched_gt: bool = False,
        freeze_bn: bool | None = None,
        size_divisible: int = 32,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if isinstance(backbone, nn.Module):
            missing = [a for a in ("out_channels", "strides", "mean", "std") if not hasattr(backbone, a)]
            if missing:
                raise ValueError(f"an injected backbone needs the attributes out_channels, strides, mean and std "
                                 f"(missing: {', '.join(missing)}); vision.backbones.create_backbone makes such one")
            self.config["backbone"] = getattr(backbone, "name", type(backbone).__name__)
            self.backbone = backbone
        else:
            self.backbone = create_backbone(backbone, pretrained=pretrained_backbone, out_strides=STRIDES[:3])
        if list(self.backbone.strides) != list(STRIDES[:3]):
            raise ValueError(f"backbone strides {self.backbone.strides} != (8, 16, 32)")
        if freeze_bn is None:
            freeze_bn = bool(pretrained_backbone)
        if freeze_bn:
            if isinstance(self.backbone, Backbone):
                self.backbone.freeze_batch_norm()
            else:
                from timm.layers import freeze_batch_norm_2d

                self.backbone = freeze_batch_norm_2d(self.backbone)
        self.fpn = build_fpn(self.backbone, fpn_channels, extra="p6p7", p6p7_from="p5")
        self.head = ATSSHead(fpn_channels, num_classes, 1, num_convs, len(STRIDES), prior_prob, norm_groups)
        min_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.transform = GeneralizedRCNNTransform(min_sizes, max_size, list(self.backbone.mean), list(self.backbone.std),
                                                  size_divisible=size_divisible)
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.num_classes = num_classes
        self.anchor_sizes = tuple(anchor_scale * s for s in STRIDES)
        self.topk = topk
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_n, self.detections_per_img = pre_nms_top_n, detections_per_img
        self.assign_unmatched_gt = assign_unmatched_gt

    # ------------------------------------------------------------------ forward
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Train mode: dict of losses; eval mode: list of {"boxes", "scores", "labels"} in original image coordinates."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if targets is not None:
            for i, t in enumerate(targets):
                b = t["boxes"]
                if b.dim() != 2 or b.shape[-1] != 4:
                    raise ValueError(f"target {i}: boxes must be [N, 4], got {tuple(b.shape)}")
                if len(t["labels"]) and (t["labels"].min() < 0 or t["labels"].max() >= self.num_classes):
                    raise ValueError(f"target {i}: labels must be in [0, {self.num_classes - 1}]")
                if b.numel() and ((b[:, 2:] <= b[:, :2]).any()):
                    raise ValueError(f"target {i}: degenerate box (x2 <= x1 or y2 <= y1)")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if targets is not None:
            targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets]
        image_list, targets = self.transform(images, targets)
        feats = self.fpn(self.backbone(image_list.tensors))
        cls, box, ctr = self.head(feats)
        sizes = [(f.shape[-2], f.shape[-1]) for f in feats]
        num_per_level = [h * w for h, w in sizes]
        anchors = grid_anchors(sizes, STRIDES, self.anchor_sizes, device=feats[0].device)
        n = len(images)
        cls_flat = torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for c in cls], 1)
        box_flat = torch.cat([b.permute(0, 2, 3, 1).reshape(n, -1, 4) for b in box], 1)
        ctr_flat = torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1) for c in ctr], 1)
        if self.training:
            return self.compute_loss(cls_flat, box_flat, ctr_flat, anchors, num_per_level, targets)
        dets = self.postprocess(cls_flat, box_flat, ctr_flat, anchors, num_per_level, image_list.image_sizes)
        return self.transform.postprocess(dets, image_list.image_sizes, original_sizes)

    # ------------------------------------------------------------------ training
    def compute_loss(self, cls: Tensor, box: Tensor, ctr: Tensor, anchors: Tensor, num_per_level: list[int],
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Focal loss / num_pos, GIoU loss weighted by centerness targets, centerness BCE / num_pos (official ATSS)."""
        cls, box, ctr = cls.float(), box.float(), ctr.float()
        cls_targets = torch.zeros_like(cls)
        pos_img, pos_anchor, pos_gt_boxes = [], [], []
        for i, t in enumerate(targets):
            assigned = atss_assign(anchors, num_per_level, t["boxes"], topk=self.topk,
                                   assign_unmatched_gt=self.assign_unmatched_gt)
            pos = torch.nonzero(assigned >= 0).squeeze(1)
            gt_idx = assigned[pos]
            cls_targets[i, pos, t["labels"][gt_idx]] = 1.0
            pos_img.append(torch.full_like(pos, i))
            pos_anchor.append(pos)
            pos_gt_boxes.append(t["boxes"][gt_idx])
        pi, pa = torch.cat(pos_img), torch.cat(pos_anchor)
        gt_boxes = torch.cat(pos_gt_boxes)
        num_pos = torch.tensor(float(pa.numel()), device=cls.device)
        num_pos_avg = _mean_over_gpus(num_pos).clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(cls, cls_targets, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                      reduction="sum") / num_pos_avg
        if pa.numel() == 0:  # no positive anywhere: keep the graph, zero regression losses
            zero = box.sum() * 0.0 + ctr.sum() * 0.0
            _mean_over_gpus(torch.zeros((), device=cls.device))  # keep collectives in step across ranks
            return {"loss_cls": loss_cls, "loss_bbox": zero, "loss_centerness": zero.clone()}
        pos_anchors = anchors[pa]
        points = (pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2.0
        ctr_t = centerness_targets(points, gt_boxes)
        pred_boxes = self.box_coder.decode_single(box[pi, pa], pos_anchors)
        sum_ctr_avg = _mean_over_gpus(ctr_t.sum().detach()).clamp(min=1e-6)
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        loss_bbox = self.reg_loss_weight * (giou * ctr_t).sum() / sum_ctr_avg
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pi, pa], ctr_t, reduction="sum") / num_pos_avg
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, cls: Tensor, box: Tensor, ctr: Tensor, anchors: Tensor, num_per_level: list[int],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per level: sigmoid(cls) > thresh, score = sigmoid(cls) * sigmoid(ctr), top-k; then class-wise NMS, top N."""
        results = []
        C = self.num_classes
        for i, size in enumerate(image_sizes):
            all_boxes, all_scores, all_labels = [], [], []
            start = 0
            for n in num_per_level:
                sl = slice(start, start + n)
                start += n
                prob = cls[i, sl].float().sigmoid()
                cand = prob > self.score_thresh
                if not cand.any():
                    continue
                score = prob * ctr[i, sl].float().sigmoid()[:, None]
                flat_idx = torch.nonzero(cand.reshape(-1)).squeeze(1)
                s = score.reshape(-1)[flat_idx]
                if s.numel() > self.pre_nms_top_n:
                    s, top = s.topk(self.pre_nms_top_n)
                    flat_idx = flat_idx[top]
                a_idx = torch.div(flat_idx, C, rounding_mode="floor") + sl.start
                labels = flat_idx % C
                boxes = self.box_coder.decode_single(box[i, a_idx].float(), anchors[a_idx])
                boxes = clip_boxes_to_image(boxes, size)
                keep = remove_small_boxes(boxes, 1e-2)
                all_boxes.append(boxes[keep])
                all_scores.append(s[keep])
                all_labels.append(labels[keep])
            if all_boxes:
                boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
                keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            else:
                boxes = cls.new_zeros((0, 4), dtype=torch.float32)
                scores = cls.new_zeros((0,), dtype=torch.float32)
                labels = torch.zeros((0,), dtype=torch.long, device=cls.device)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        return results


@DETECTORS.register("atss")
def atss(num_classes: int, **kwargs: Any) -> ATSS:
    """ATSS (the default detector of ``negvision detect``)."""
    return ATSS(num_classes, **kwargs)


__all__ = ["ATSS", "grid_anchors", "centerness_targets", "STRIDES", "atss"]
