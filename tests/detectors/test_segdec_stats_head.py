"""The decision network's statistics branch (``stats_head``): what it computes, that it reads a whole-image change
of the feature statistics, that gradients reach it, and that runs record and reload it."""

from __future__ import annotations

import torch

from detectors.segdec.model import (
    N_PIXEL_MAPS,
    STATS_EPS,
    STATS_HIDDEN,
    STATS_STRIDES,
    SegDecNet,
    channel_statistics,
    pixel_maps,
)
from detectors.segdec.spec import build_from_spec


def test_channel_statistics_by_hand():
    a = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # mean 4, population std sqrt(5)
    b = torch.zeros(1, 2, 1, 3)
    b[0, 1] = torch.tensor([2.0, 2.0, 2.0])
    s = channel_statistics([a, b])
    # order: map a (mean, logstd), map b (means of its 2 channels, logstds of its 2 channels)
    want = torch.tensor([[4.0, float(torch.log(torch.tensor(5.0).sqrt() + STATS_EPS)), 0.0, 2.0,
                          float(torch.log(torch.tensor(STATS_EPS))), float(torch.log(torch.tensor(STATS_EPS)))]])
    assert torch.allclose(s, want, atol=1e-6)


def test_stats_head_reads_a_global_contrast_change():
    # the paper's decision head FeatureNorms every map by its own spread; the statistics branch reads the spread
    torch.manual_seed(0)
    x = 0.5 + 0.1 * torch.randn(2, 1, 32, 32)
    x2 = 0.5 + 1.3 * (x - 0.5)  # the whole image's contrast x1.3
    torch.manual_seed(1)
    m = SegDecNet(width=0.25, stats_head=True).eval()
    assert m.config["stats_head"] is True
    with torch.no_grad():
        v1, v2 = m.volume(x), m.volume(x2)
        s1, s2 = channel_statistics([v1]), channel_statistics([v2])
    assert not torch.allclose(s1, s2, atol=1e-3)


def test_registry_trunk_stats_use_strides_2_4_8_and_gradients_reach_them():
    torch.manual_seed(0)
    m = SegDecNet(in_channels=1, backbone="mobilenetv3_small_050", stats_head=True)
    assert m.volume.strides == sorted(set(STATS_STRIDES) | {8})
    n = 2 * sum(m.volume.stats_channels) + 2 * N_PIXEL_MAPS
    assert m.stats[0].in_features == n and m.fc.in_features == 66 + STATS_HIDDEN
    dec, seg = m(torch.rand(2, 1, 32, 48), grad_multiplier=1.0)
    assert dec.shape == (2,) and seg.shape == (2, 1, 4, 6)
    dec.sum().backward()
    first = next(m.volume.backbone.parameters())
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    assert float(m.stats[0].weight.grad.abs().sum()) > 0


def test_decision_cam_and_rebuild_from_spec_with_stats_head():
    torch.manual_seed(0)
    m = SegDecNet(in_channels=1, backbone="mobilenetv3_small_050", stats_head=True).eval()
    x = torch.rand(2, 1, 32, 32)
    dec, cam = m.decision_cam(x)
    assert torch.allclose(dec, m(x)[0], atol=1e-5) and cam.shape == (2, 1, 4, 4) and float(cam.max()) > 0
    spec = {"model": m.config}
    m2 = build_from_spec(spec)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.allclose(m2.eval()(x)[0], m(x)[0], atol=1e-6)
    # a spec written before the branch existed rebuilds the paper's head
    old = build_from_spec({"model": {"in_channels": 1, "width": 0.25}})
    assert not old.stats_head and old.fc.in_features == 66 and "stats_head" not in old.config


def test_pixel_maps_by_hand():
    x = torch.zeros(1, 3, 5, 5)
    x[..., :, 3:] = 1.0  # a vertical step edge between columns 2 and 3, in every channel
    g, grad, lap = pixel_maps(x)
    assert g.shape == (1, 1, 5, 5) and grad.shape == lap.shape == (1, 1, 3, 3)
    # Sobel x across the step: columns (1, 2, 3) of the valid output see 0, 4, 4; y: 0
    assert torch.allclose(grad[0, 0], torch.tensor([[0.0, 4.0, 4.0]] * 3), atol=1e-5)
    # Laplacian: +1 left of the edge, -1 right of it
    assert torch.allclose(lap[0, 0], torch.tensor([[0.0, 1.0, -1.0]] * 3))


def test_trunk_lr_scale_zero_keeps_the_trunk_and_trains_the_head(tmp_path):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from _settings import train_segdec
    from vision.data.defects import make_defects

    data = make_defects(tmp_path / "d", n_train=12, n_test=0, img_size=32, seed=3, image_level_fraction=0.0)
    run = tmp_path / "run"
    train_segdec(data, run, num_segmented=0, backbone="mobilenetv3_small_050", pretrained=False, trunk_lr_scale=0.0,
                 epochs=2, batch=4, device="cpu", progress=False, val_split=0, workers=0)  # epoch 0: w_dec = 0
    set_seed(0)  # train_segdec builds the network right after set_seed(seed): the same initial weights
    init = SegDecNet(1, grad_multiplier=0.0, backbone="mobilenetv3_small_050", stats_head=True).state_dict()
    trained = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    trunk = [k for k in init if k.startswith("volume.") and "running" not in k and "num_batches" not in k]
    assert trunk and all(torch.equal(trained[k], init[k]) for k in trunk)
    assert not torch.equal(trained["fc.weight"], init["fc.weight"])
    assert not torch.equal(trained["stats.0.weight"], init["stats.0.weight"])
    import json

    assert json.loads((run / "segdec.json").read_text())["train"]["trunk_lr_scale"] == 0.0


def test_a_run_from_before_the_statistics_branch_resumes_with_its_own_network(tmp_path):
    import json

    from _settings import train_segdec
    from vision.data.defects import make_defects

    data = make_defects(tmp_path / "d", n_train=12, n_test=0, img_size=32, seed=4, image_level_fraction=0.0)
    run = tmp_path / "run"
    kw = dict(num_segmented=0, backbone="mobilenetv3_small_050", pretrained=False, batch=4, device="cpu",
              progress=False, val_split=0, workers=0)
    first = train_segdec(data, run, stats_head=False, epochs=1, **kw)  # a labels-only run before the branch
    s = train_segdec(data, run, resume=True, epochs=2, **kw)  # stats_head unset: the run's own network
    assert s["steps"] == 2 * first["steps"] > 0
    assert "stats_head" not in json.loads((run / "segdec.json").read_text())["model"]
