"""ATSS head, anchors, targets and losses; one training step and one eval on a tiny model."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from detectors.atss import ATSS, ATSSHead, centerness_targets, grid_anchors


def tiny(**kw):
    cfg = dict(backbone="resnet18", fpn_channels=32, num_convs=1, min_size=128, max_size=128)
    cfg.update(kw)
    return ATSS(4, **cfg)


def test_head_shapes_and_init():
    head = ATSSHead(64, num_classes=5, num_convs=4, num_levels=2)
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in head.cls_tower) == 4
    feats = [torch.rand(2, 64, 16, 16), torch.rand(2, 64, 8, 8)]
    cls, box, ctr = head(feats)
    assert [c.shape for c in cls] == [(2, 5, 16, 16), (2, 5, 8, 8)]
    assert [b.shape for b in box] == [(2, 4, 16, 16), (2, 4, 8, 8)]
    assert [c.shape for c in ctr] == [(2, 1, 16, 16), (2, 1, 8, 8)]
    # prior probability 0.01 at the start
    assert torch.allclose(head.cls_logits.bias.sigmoid(), torch.full((5,), 0.01))
    assert len(head.scales) == 2 and head.scales[0].scale.item() == 1.0
    with pytest.raises(ValueError, match="divisible"):
        ATSSHead(48, 3)


def test_grid_anchors_one_square_anchor_of_8_strides():
    a = grid_anchors([(2, 3), (1, 1)], [8, 16], [64, 128])
    assert a.shape == (7, 4)
    assert a[0].tolist() == [-32, -32, 32, 32]
    assert a[1].tolist() == [-24, -32, 40, 32]  # x = 8
    assert a[3].tolist() == [-32, -24, 32, 40]  # second row, y = 8
    assert a[6].tolist() == [-64, -64, 64, 64]


def test_centerness_targets_hand_checked():
    pts = torch.tensor([[5.0, 5.0], [2.0, 5.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    c = centerness_targets(pts, boxes)
    assert c[0].item() == pytest.approx(1.0)
    assert c[1].item() == pytest.approx(math.sqrt(2 / 8 * 1.0))


def targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 40.0, 120.0, 100.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_train_step_losses_finite_and_backward():
    m = tiny().train()
    imgs = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    losses = m(imgs, targets())
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.head.cls_logits.weight.grad.abs().sum() > 0


def test_images_without_boxes_train_without_nan():
    m = tiny().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = m([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0
    sum(losses.values()).backward()


def test_loss_normalisation_and_perfect_regression():
    m = tiny().train()
    img_list, tg = m.transform([torch.rand(3, 128, 128)], [targets()[0]])
    feats = m.fpn(m.backbone(img_list.tensors))
    sizes = [(f.shape[-2], f.shape[-1]) for f in feats]
    anchors = grid_anchors(sizes, (8, 16, 32, 64, 128), m.anchor_sizes)
    A = anchors.shape[0]
    from detectors.atss import atss_assign

    assigned = atss_assign(anchors, [h * w for h, w in sizes], tg[0]["boxes"])
    pos = assigned >= 0
    gt = tg[0]["boxes"][assigned[pos]]
    cls = torch.randn(1, A, 4)
    box = torch.zeros(1, A, 4)
    box[0, pos] = m.box_coder.encode_single(gt, anchors[pos])  # exact regression
    pts = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    ct = centerness_targets(pts, gt)
    ctr = torch.zeros(1, A)
    losses = m.compute_loss(cls, box, ctr, anchors, [h * w for h, w in sizes], tg)
    npos = pos.sum().item()
    onehot = torch.zeros(1, A, 4)
    onehot[0, pos, tg[0]["labels"][assigned[pos]]] = 1
    assert losses["loss_cls"].item() == pytest.approx(sigmoid_focal_loss(cls, onehot, reduction="sum").item() / npos, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(npos), ct, reduction="sum") / npos
    assert losses["loss_centerness"].item() == pytest.approx(bce.item(), rel=1e-5)


def test_eval_returns_boxes_in_original_coordinates():
    m = tiny().eval()
    # make the classifier fire everywhere so detections exist
    torch.nn.init.constant_(m.head.cls_logits.bias, 5.0)
    imgs = [torch.rand(3, 300, 200), torch.rand(3, 64, 90)]
    with torch.no_grad():
        out = m(imgs)
    assert len(out) == 2
    for o, im in zip(out, imgs, strict=True):
        assert set(o) == {"boxes", "scores", "labels"}
        assert 0 < len(o["boxes"]) <= 100
        assert (o["boxes"][:, 2] <= im.shape[-1] + 1e-3).all() and (o["boxes"][:, 3] <= im.shape[-2] + 1e-3).all()
        assert (o["scores"] <= 1).all() and (o["labels"] < 4).all()
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])


def test_bad_targets_raise():
    m = tiny().train()
    with pytest.raises(ValueError, match="labels"):
        m([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([7])}])
    with pytest.raises(ValueError, match="degenerate"):
        m([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, 1, 5, 9]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="targets are required"):
        m([torch.rand(3, 64, 64)])


def test_overfits_one_image():
    torch.manual_seed(0)
    m = tiny(fpn_channels=64, num_convs=2).train()
    img = torch.rand(3, 128, 128)
    tg = [targets()[0]]
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(25):
        loss = sum(m([img], tg).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.gpu
def test_cuda_amp_train_step():
    m = tiny().cuda().train()
    imgs = [torch.rand(3, 128, 128, device="cuda")]
    tg = [{k: v.cuda() for k, v in targets()[0].items()}]
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        losses = m(imgs, tg)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_box_coder_hand_checked_and_matches_torchvision():
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder  # the reference only

    from detectors.atss.box_coder import BoxCoder

    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[1.0, 2.0, 21.0, 12.0]])  # centre (11, 7) vs (5, 5); size 20 x 10 vs 10 x 10
    d = coder.encode_single(box, anchor)
    torch.testing.assert_close(d, torch.tensor([[10 * 6 / 10, 10 * 2 / 10, 5 * math.log(2.0), 0.0]]))
    torch.testing.assert_close(coder.decode_single(d, anchor), box)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g) * 50), 1)
    deltas = torch.randn(50, 4, generator=g)
    ref = TVBoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode_single(deltas, anchors), ref.decode_single(deltas, anchors))
    boxes = coder.decode_single(deltas, anchors)
    torch.testing.assert_close(coder.encode_single(boxes, anchors), ref.encode_single(boxes, anchors))


def test_atss_takes_an_injected_backbone_module():
    from detectors.registry import DETECTORS
    from detectors.zoo import list_detectors

    class Tiny(nn.Module):
        out_channels = (8, 8, 8)
        strides = (8, 16, 32)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

        def __init__(self):
            super().__init__()
            self.c3 = nn.Conv2d(3, 8, 3, stride=8, padding=1)
            self.c4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.c5 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

        def forward(self, x):
            c3 = self.c3(x)
            c4 = self.c4(c3)
            return [c3, c4, self.c5(c4)]

    m = ATSS(3, backbone=Tiny(), fpn_channels=16, num_convs=1, min_size=64, max_size=64, norm_groups=4)
    losses = m([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    assert set(losses) >= {"loss_cls", "loss_bbox"} and all(torch.isfinite(v) for v in losses.values())
    m.eval()
    assert set(m([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="needs the attributes"):
        ATSS(3, backbone=nn.Conv2d(3, 8, 3))
    assert "atss" in DETECTORS and list_detectors() == ["atss", "fcos", "retinanet"]


def test_head_groupnorm_takes_one_value_per_group():
    # one image, one channel per group, a 1 x 1 map (P7 of a <= 128 px image with --fpn-channels 32): PyTorch's
    # GroupNorm refuses; the normalised single value is 0, so the output is the bias
    from detectors.atss.head import GroupNorm

    gn = GroupNorm(4, 4)
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([2.0, 3.0, 4.0, 5.0]))
        gn.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 7.0]))
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value"):
        torch.nn.functional.group_norm(x, 4, gn.weight, gn.bias)
    assert torch.equal(gn(x), gn.bias.view(1, 4, 1, 1))
    ref = torch.nn.GroupNorm(4, 4)
    ref.load_state_dict(gn.state_dict())  # same parameters and keys
    for shape in ((2, 4, 1, 1), (1, 4, 3, 2)):
        y = torch.randn(*shape)
        assert torch.equal(gn(y), ref(y))
