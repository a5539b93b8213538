"""PatchCore: greedy coreset, kNN distance, shapes, safetensors round trip, calibration, a pasted defect found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from detectors.segdec.patchcore import PatchCore, greedy_coreset, knn_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py


def _brick_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` grey crops [n, 1, size, size] in [0, 1] of skimage's brick-wall texture (good images)."""
    from skimage import data

    brick = torch.from_numpy(data.brick().astype(np.float32) / 255)
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, brick.shape[0] - size, (n,), generator=g).tolist()
    xs = torch.randint(0, brick.shape[1] - size, (n,), generator=g).tolist()
    return torch.stack([brick[y:y + size, x:x + size] for y, x in zip(ys, xs, strict=True)])[:, None]


def _paste_square(x: torch.Tensor, top: int, left: int, side: int) -> torch.Tensor:
    out = x.clone()
    out[..., top:top + side, left:left + side] = 1.0
    return out


@pytest.fixture(scope="module")
def fitted(one_thread):
    """A grey ResNet-18 PatchCore (random weights) fitted on 10 brick crops of 32 px, with its fit report."""
    torch.manual_seed(0)
    m = PatchCore(in_channels=1, backbone="resnet18", pretrained=False, coreset_ratio=0.25)
    report = m.fit(_brick_crops(10, 32, seed=0).split(4), seed=0)
    return m, report


# greedy coreset -------------------------------------------------------------------------------------------------

def test_coreset_on_a_line_picks_the_farthest_points_in_order():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # worked by hand from each start: the farthest point from the start, then the farthest from both
    expected = {0: [0, 4, 3], 1: [1, 4, 3], 2: [2, 4, 0], 3: [3, 4, 0], 4: [4, 0, 3]}
    starts = set()
    for seed in range(12):
        idx = greedy_coreset(x, 3, seed=seed, proj_dim=None).tolist()
        assert idx == expected[idx[0]]
        starts.add(idx[0])
    assert len(starts) > 1  # the start is drawn from the seed


def test_coreset_takes_one_point_per_cluster_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0] * 16, [10.0] * 16, [-10.0] * 8 + [10.0] * 8])
    pts = torch.cat([c + 0.1 * torch.randn(20, 16, generator=g) for c in centers])  # clusters 0-19, 20-39, 40-59
    for proj_dim in (None, 4):
        idx = greedy_coreset(pts, 3, seed=5, proj_dim=proj_dim)
        assert idx.dtype == torch.long and sorted(int(i) // 20 for i in idx) == [0, 1, 2]
        assert torch.equal(idx, greedy_coreset(pts, 3, seed=5, proj_dim=proj_dim))
    idx = greedy_coreset(pts, 30, seed=3)
    assert len(set(idx.tolist())) == 30  # no point picked twice
    assert torch.equal(greedy_coreset(pts, 60, seed=3), torch.arange(60))  # n >= N: all, in order
    assert torch.equal(greedy_coreset(pts, 99, seed=3), torch.arange(60))
    assert greedy_coreset(pts, 0).numel() == 0
    with pytest.raises(ValueError, match="N, D"):
        greedy_coreset(pts[0], 1)


# nearest-neighbour distance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_equals_brute_force(k):
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    brute = torch.tensor([sorted(float((qi - b).norm()) for b in bank)[:k] for qi in q]).mean(dim=1)
    for chunk in (None, 5):
        torch.testing.assert_close(knn_distance(q, bank, k=k, chunk_size=chunk), brute, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        knn_distance(q, bank[:0])


# the scorer -----------------------------------------------------------------------------------------------------

def test_fit_report_and_calibration(fitted):
    m, r = fitted
    assert (r["images"], r["bank_images"], r["holdout_images"]) == (10, 8, 2)  # images 4 and 9 held out
    assert r["patches"] == 8 * 4 * 4 and r["bank_size"] == 32 == m.memory_bank.shape[0]
    assert m.memory_bank.shape[1] == r["feature_dim"] == 128 + 256  # ResNet-18 layers 2 + 3, not reduced
    assert r["score_center"] == max(r["holdout_scores"]) and r["score_scale"] > 0
    held = _brick_crops(10, 32, seed=0)[[4, 9]]
    dec, _ = m(held)
    assert (dec <= 1e-4).all()  # the held-out good images map to logits <= 0 (sigmoid <= 0.5)


def test_forward_shapes_and_fit_is_deterministic(fitted):
    m, _ = fitted
    for h, w in [(32, 32), (40, 64)]:
        dec, seg = m(torch.rand(3, 1, h, w))
        assert dec.shape == (3,) and seg.shape == (3, 1, h // 8, w // 8)
        assert torch.isfinite(dec).all() and torch.isfinite(seg).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="input channel"):
        m(torch.rand(1, 3, 32, 32))
    again = PatchCore(in_channels=1, backbone="resnet18", pretrained=False, coreset_ratio=0.25)
    again.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("backbone.")}, strict=False)
    again.fit(_brick_crops(10, 32, seed=0).split(3), seed=0)  # other batching, same seed: the same bank
    assert torch.equal(again.memory_bank, m.memory_bank)
    assert torch.equal(again.score_center, m.score_center)


def test_state_dict_round_trip_through_safetensors(fitted, tmp_path):
    m, _ = fitted
    save_file(m.state_dict(), str(tmp_path / "patchcore.safetensors"))
    fresh = PatchCore(**m.config, pretrained=False)  # other random backbone weights, empty bank
    assert not fresh.fitted
    fresh.load_state_dict(load_file(str(tmp_path / "patchcore.safetensors")))
    assert fresh.memory_bank.shape == m.memory_bank.shape  # the buffer took the file's size
    x = torch.rand(2, 1, 32, 32)
    for a, b in zip(m(x), fresh(x), strict=True):
        assert torch.equal(a, b)
    other = PatchCore(backbone="resnet18", pretrained=False, feature_dim=64)
    with pytest.raises(RuntimeError, match="memory_bank"):
        other.load_state_dict(m.state_dict())


def test_grey_input_equals_the_grey_image_repeated_to_three_channels(fitted):
    m, _ = fitted
    rgb = PatchCore(in_channels=3, backbone="resnet18", pretrained=False)
    rgb.load_state_dict(m.state_dict())
    x = _brick_crops(2, 32, seed=7)
    for a, b in zip(m(x), rgb(x.repeat(1, 3, 1, 1)), strict=True):
        torch.testing.assert_close(a, b)
    rgb.fit([torch.rand(4, 3, 32, 32)])
    dec, seg = rgb(torch.rand(2, 3, 32, 32))
    assert dec.shape == (2,) and seg.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="in_channels"):
        PatchCore(in_channels=2, backbone="resnet18", pretrained=False)


def test_fit_takes_dataloader_dicts_and_skips_defective_items():
    m = PatchCore(backbone="resnet18", pretrained=False)
    imgs = _brick_crops(6, 32, seed=1)
    batches = [{"image": imgs[:3], "label": torch.tensor([0.0, 1.0, 0.0])},
               {"image": imgs[3:], "label": torch.tensor([0.0, 0.0, 0.0])}]
    r = m.fit(batches)
    assert (r["images"], r["skipped_defective"], r["holdout_images"]) == (5, 1, 1)


def test_run_inference_takes_it_like_a_segdecnet(fitted):
    """The project's evaluation loop (sigmoid of both outputs) runs a PatchCore unchanged."""
    from detectors.segdec.evaluate import run_inference

    m, _ = fitted
    items = [{"image": img} for img in _brick_crops(3, 32, seed=3)]
    probs, segs = run_inference(m, items, batch=2)  # any sized sequence of {"image": [C, H, W]} items
    assert probs.shape == (3,) and ((probs > 0) & (probs < 1)).all()
    assert len(segs) == 3 and segs[0].shape == (4, 4)
    assert m.training and not m.backbone.training  # mode restored; the frozen backbone stays in eval mode


def test_errors_for_no_images_and_scoring_before_fit():
    m = PatchCore(backbone="resnet18", pretrained=False)
    with pytest.raises(ValueError, match="empty memory bank"):
        m(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="no .*images"):
        m.fit([])
    with pytest.raises(ValueError, match="no .*images"):
        m.fit([torch.rand(0, 1, 32, 32)])
    with pytest.raises(ValueError, match="patch_size"):
        PatchCore(backbone="resnet18", pretrained=False, patch_size=2)


def test_pasted_square_scores_higher_and_the_map_peaks_on_it():
    """The real EfficientNet-Lite0 (offline wheel): a bright square pasted on a brick wall is found."""
    m = PatchCore(in_channels=1)  # efficientnet_lite0.offline, pretrained
    assert m.layers == (2, 3) and m.backbone.strides == [8, 16]
    r = m.fit(_brick_crops(40, 64, seed=0).split(8), seed=0)
    assert r["holdout_images"] == 8 and r["feature_dim"] == 40 + 112
    good = _brick_crops(8, 64, seed=100)
    bad = _paste_square(good, top=24, left=8, side=16)  # grid cells rows 3-4, columns 1-2
    dec_good, _ = m(good)
    dec_bad, seg_bad = m(bad)
    assert dec_good.median() < 0 and (dec_bad > 0).all()  # sigmoid: a typical good image < 0.5 < a defect
    assert dec_bad.min() > dec_good.max() and (dec_bad > dec_good).all()
    peak = seg_bad[:, 0].flatten(1).argmax(dim=1)
    rows, cols = peak // seg_bad.shape[-1], peak % seg_bad.shape[-1]
    on_square = (rows >= 2) & (rows <= 5) & (cols >= 0) & (cols <= 3)  # the square's cells, give or take one
    assert int(on_square.sum()) >= 7
    assert int((torch.sigmoid(seg_bad).amax(dim=(1, 2, 3)) > 0.5).sum()) >= 7
