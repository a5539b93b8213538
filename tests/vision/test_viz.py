"""Tests for vision.viz: every picture has the right size and actually shows what it should."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from vision import viz


def _black(w: int = 100, h: int = 80) -> Image.Image:
    return Image.new("RGB", (w, h), (0, 0, 0))


def test_to_pil_input_types() -> None:
    arr = np.zeros((12, 16, 3), np.uint8)
    arr[..., 0] = 255
    t = torch.zeros(3, 12, 16)
    t[0] = 1.0
    for im in (Image.fromarray(arr), arr, t, t.to(torch.uint8) * 255, np.zeros((12, 16), np.float32)):
        pil = viz.to_pil(im)
        assert pil.mode == "RGB" and pil.size == (16, 12)
    assert viz.to_pil(t).getpixel((3, 3)) == (255, 0, 0)
    with pytest.raises(ValueError):
        viz.to_pil(np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor"])
def test_draw_boxes_draws_edges_and_labels(kind: str) -> None:
    base = _black()
    image = {"pil": base, "numpy": np.asarray(base), "tensor": torch.zeros(3, 80, 100)}[kind]
    boxes = torch.tensor([[10.0, 30.0, 60.0, 70.0], [70.0, 5.0, 95.0, 25.0]])
    out = viz.draw_boxes(image, boxes, labels=torch.tensor([0, 1]), scores=torch.tensor([0.87, 0.5]),
                         class_names=["cat", "dog"], width=2)
    assert isinstance(out, Image.Image) and out.size == (100, 80)
    a = np.asarray(out)
    assert a[50, 10].any() and a[50, 59].any()          # left / right edges of box 0
    assert a[30, 35].any() and a[69, 35].any()          # top / bottom edges
    assert not a[50, 35].any()                          # interior untouched
    assert tuple(a[50, 10]) != tuple(a[15, 70])         # one colour per class
    assert a[30 - 3, 12:40].any()                       # caption background above box 0
    assert np.asarray(base).sum() == 0                  # input not modified


def test_draw_boxes_empty_and_mismatch() -> None:
    out = viz.draw_boxes(_black(), torch.zeros((0, 4)), labels=torch.zeros(0, dtype=torch.long))
    assert out.size == (100, 80) and np.asarray(out).sum() == 0
    out = viz.draw_boxes(_black(), np.zeros((0, 4)))
    assert np.asarray(out).sum() == 0
    out = viz.draw_boxes(_black(), [[5, 5, 50, 50]], color_by_class=False, font_size=12)
    assert np.asarray(out)[20, 5].any()
    with pytest.raises(ValueError, match="labels"):
        viz.draw_boxes(_black(), [[0, 0, 5, 5]], labels=[0, 1])


def test_overlay_heatmap() -> None:
    img = Image.new("RGB", (40, 30), (128, 128, 128))
    heat = torch.linspace(-3, 5, 35).reshape(5, 7)   # any size, not in 0..1 -> normalised
    out = viz.overlay_heatmap(img, heat, alpha=0.5)
    assert out.size == (40, 30) and out.mode == "RGB"
    a = np.asarray(out).astype(int)
    assert not np.array_equal(a[0, 0], a[-1, -1])     # low and high ends of the map differ
    same = viz.overlay_heatmap(img, np.ones((3, 3)), alpha=0.0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    assert viz.overlay_heatmap(img, np.zeros((1, 30, 40))).size == (40, 30)  # constant map, 1xHxW


def test_image_grid_sizes_and_titles() -> None:
    ims = [Image.new("RGB", (20, 10), (255, 0, 0)), np.zeros((30, 15, 3), np.uint8), torch.rand(3, 8, 8)]
    g = viz.image_grid(ims, nrow=2, pad=2)
    assert g.size == (2 * 20 + 3 * 2, 2 * 30 + 3 * 2)
    g2 = viz.image_grid(ims, nrow=2, pad=2, titles=["a", "b", "c"])
    assert g2.width == g.width and g2.height > g.height
    g3 = viz.image_grid(ims, cell_size=(16, 16), pad=0)
    assert g3.size == (2 * 16, 2 * 16)
    with pytest.raises(ValueError):
        viz.image_grid([])


def test_plots_save_pngs(tmp_path) -> None:
    rec = np.linspace(0, 1, 101)
    prec = np.where(rec < 0.5, 1.0, -1.0)
    paths = [
        viz.plot_pr_curves({"cat": (rec, prec), "dog": (rec, 1 - rec)}, tmp_path / "a" / "pr.png"),
        viz.plot_roc_curve(np.array([0, 0.1, 1]), np.array([0, 0.8, 1]), tmp_path / "b" / "roc.png", auroc=0.9),
        viz.plot_score_histograms(np.random.randn(200), torch.randn(100) + 2, tmp_path / "hist.png", bins=20),
        viz.plot_metric_curve([1, 2, 3], [0.1, 0.3, 0.2], tmp_path / "m.png", "epoch", "AP", yerr=[0.01, 0.02, 0.01]),
    ]
    for p in paths:
        assert p.is_file()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert not [f for f in tmp_path.rglob(".*")]  # no temp files left behind


def test_save_image_atomic(tmp_path) -> None:
    p = viz.save_image(torch.rand(3, 9, 7), tmp_path / "x" / "img.png")
    with Image.open(p) as im:
        assert im.size == (7, 9)
    p2 = viz.save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "img.jpg")
    with Image.open(p2) as im:
        assert im.format == "JPEG"
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["img.jpg", "img.png"]
