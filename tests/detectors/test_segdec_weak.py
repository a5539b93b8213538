"""Weak / mixed supervision of SegDecNet: the per-sample gradient multiplier, the auto trunk, surface augmentation,
Grad-CAM heatmaps for labels-only runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _settings import train_segdec
from typer.testing import CliRunner

from detectors.segdec.cli import app
from detectors.segdec.data import MaskTargets, SurfaceAugment, load_defect_dataset
from detectors.segdec.model import SegDecNet, gradient_multiply
from detectors.segdec.predict import heatmap_kind
from vision.data.defects import make_defects

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory) -> Path:
    return make_defects(tmp_path_factory.mktemp("weak") / "set", n_train=12, n_test=6, img_size=32, seed=3,
                        defect_fraction=0.5, image_level_fraction=1.0)


def test_gradient_multiply_per_sample():
    x = torch.ones(3, 2, requires_grad=True)
    y = gradient_multiply(x, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(y, x)  # identity forward
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]))


def test_per_sample_multiplier_lets_only_unmasked_samples_train_the_trunk_through_the_decision():
    torch.manual_seed(0)
    net = SegDecNet(1, grad_multiplier=0.0, width=0.25)
    x = torch.rand(2, 1, 32, 32)
    trunk = next(net.volume.parameters())

    def trunk_grad(i: int, m) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        dec, _ = net(x, grad_multiplier=m)
        dec[i].backward()  # the decision loss of sample i only
        return trunk.grad if trunk.grad is not None else torch.zeros_like(trunk)

    m = torch.tensor([0.0, 1.0])  # sample 0 has a mask (official adjustment), sample 1 has none
    assert trunk_grad(0, m).abs().sum() == 0
    g1 = trunk_grad(1, m)
    assert g1.abs().sum() > 0
    assert torch.allclose(g1, trunk_grad(1, 1.0))  # = plain end-to-end for that sample
    assert trunk_grad(1, None).abs().sum() == 0  # the network's own multiplier (0): blocked


def test_surface_augment_moves_image_and_targets_together():
    img = torch.zeros(1, 32, 32)
    img[0, 2:6, 20:28] = 1.0  # a bright patch
    target = img[:, ::8, ::8].clone() * 0 + torch.nn.functional.avg_pool2d(img[None], 8)[0]  # its 1/8 map
    item = {"image": img, "seg_target": target, "seg_weight": target.clone() + 1, "label": torch.tensor(1.0)}
    aug = SurfaceAugment(brightness=0.0, contrast=0.0)
    for seed in range(12):
        out = aug(item, torch.Generator().manual_seed(seed))
        want = torch.nn.functional.avg_pool2d(out["image"][None], 8)[0]
        assert torch.allclose(out["seg_target"], want, atol=1e-6), seed  # same flip / rotation on both
        assert out["label"] is item["label"]
    a = aug(item, torch.Generator().manual_seed(5))["image"]
    assert torch.equal(a, aug(item, torch.Generator().manual_seed(5))["image"])  # seeded
    wide = {"image": torch.rand(1, 16, 32), "seg_target": torch.rand(1, 2, 4), "seg_weight": torch.rand(1, 2, 4)}
    shapes = {tuple(SurfaceAugment()(wide, torch.Generator().manual_seed(s))["image"].shape) for s in range(20)}
    assert shapes == {(1, 16, 32)}  # non-square: 0 or 180 degrees only
    jit = SurfaceAugment(flip=False, rot90=False, brightness=0.2, contrast=0.3)(item, torch.Generator().manual_seed(1))
    assert 0 <= float(jit["image"].min()) and float(jit["image"].max()) <= 1 and not torch.equal(jit["image"], img)


def test_decision_cam_is_grad_cam_of_the_decision():
    torch.manual_seed(0)
    net = SegDecNet(1, width=0.25).eval()
    x = torch.rand(2, 1, 128, 128)  # big enough that the decision net's last maps are not 1 x 1
    dec, cam = net.decision_cam(x)
    assert cam.shape == (2, 1, 16, 16) and float(cam.min()) >= 0 and float(cam.amax()) <= 1 + 1e-6
    with torch.no_grad():
        want_dec, _ = net(x)
    assert torch.allclose(dec, want_dec, atol=1e-5)
    # by hand, sample 0
    vol = net.volume(x[:1]).detach().requires_grad_(True)
    d = net._decide(vol, net.seg_mask(vol), 1.0)
    (g,) = torch.autograd.grad(d.sum(), vol)
    c = torch.relu((g.mean(dim=(2, 3), keepdim=True) * vol).sum(1, keepdim=True))
    assert float(c.max()) > 1e-6  # a real gradient, not float noise
    assert torch.allclose(cam[:1], c / c.max(), atol=1e-4)
    with torch.no_grad():  # also under no_grad / inference mode (predict)
        assert net.decision_cam(x)[1].shape == (2, 1, 16, 16)


def test_labels_only_run_uses_the_pretrained_trunk_and_writes_cam_heatmaps(labels_only, tmp_path):
    run = tmp_path / "weak"
    train_segdec(labels_only, run, epochs=1, batch=4, device="cpu", progress=False, eval_every=0, workers=0)
    spec = json.loads((run / "segdec.json").read_text())
    assert spec["model"]["backbone"] == "efficientnet_lite0.offline" and spec["pretrained_backbone"] is True
    assert spec["model"]["stats_head"] is True  # the labels-only default: the decision's statistics branch
    t = spec["train"]
    assert t["supervision"] == "weak" and t["defective_with_masks"] == 0 and t["weak_grad_multiplier"] == 1.0
    assert t["augment"]["flip"] and t["lr"] == 1e-3 and t["optimizer"] == "adamw"
    assert heatmap_kind(spec) == "cam" and heatmap_kind(spec, "segmentation") == "segmentation"
    src = labels_only / "test" / "images"
    r = CliRunner().invoke(app, ["predict", "--weights", str(run), "--source", str(src), "--out", str(tmp_path / "p"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    pred = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert pred["heatmap"] == "cam" and "Grad-CAM" in pred["heatmap_meaning"]
    assert all(p["heatmap_kind"] == "cam" and Path(p["heatmap"]).is_file() for p in pred["predictions"])
    r = CliRunner().invoke(app, ["predict", "--weights", str(run), "--source", str(src), "--out", str(tmp_path / "q"),
                                 "--heatmap", "segmentation", "--device", "cpu"])
    assert r.exit_code == 0 and json.loads((tmp_path / "q" / "predictions.json").read_text())["heatmap"] == "segmentation"
    r = CliRunner().invoke(app, ["predict", "--weights", str(tmp_path / "m.onnx"), "--source", str(src), "--heatmap",
                                 "cam"])
    assert r.exit_code == 2 and "needs the PyTorch weights" in r.output


def test_full_masks_keep_the_paper_setup(tmp_path):
    data = make_defects(tmp_path / "full", n_train=8, n_test=0, img_size=32, seed=1, image_level_fraction=0.0)
    run = tmp_path / "run"
    train_segdec(data, run, epochs=1, batch=4, width=0.25, device="cpu", progress=False, eval_every=0, workers=0)
    spec = json.loads((run / "segdec.json").read_text())
    t = spec["train"]
    assert spec["model"]["backbone"] is None and t["supervision"] == "full" and t["augment"] is None
    assert "stats_head" not in spec["model"]  # the paper's decision network
    assert t["optimizer"] == "sgd" and t["lr"] == 0.05 and t["weak_grad_multiplier"] is None  # the preset
    # the official weak behaviour stays available: multiplier 0 for every sample, paper trunk, no augmentation
    ds = load_defect_dataset(data, "train", targets=MaskTargets(num_segmented=0), progress=False)
    assert sum(ds.labels) > 0 and not any(s for s, lab in zip(ds.segmented, ds.labels, strict=True) if lab)
    run2 = tmp_path / "official"
    train_segdec(data, run2, epochs=1, batch=4, width=0.25, device="cpu", progress=False, eval_every=0, workers=0,
                 num_segmented=0, backbone="paper", weak_grad_multiplier=0.0, augment=False, dynamic=False)
    t2 = json.loads((run2 / "segdec.json").read_text())["train"]
    assert t2["supervision"] == "weak" and t2["weak_grad_multiplier"] == 0.0 and t2["augment"] is None
