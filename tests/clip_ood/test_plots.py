"""clip_ood.plots: the FPR95 point of the log-FPR ROC on hand-made scores, and the retrieval examples picture."""

import numpy as np
import pytest
from PIL import Image

from clip_ood.metrics import ood_metrics
from clip_ood.plots import (
    GREEN,
    RED,
    fpr95_point,
    fpr_floor,
    grid_layout,
    pick_queries,
    plot_roc_logfpr,
    retrieval_examples,
    retrieval_examples_size,
    roc_logfpr_data,
    save_retrieval_examples,
)

# 20 ID scores 1..20: TPR 95 % keeps 19 of them, so the threshold is the 2nd lowest, 2.0.
# 20 OOD scores: 3 of them (2.0, 5.0, 10.0) are >= 2.0, so FPR95 = 3 / 20 = 0.15.
SID = np.arange(1.0, 21.0)
SOOD = np.array([2.0, 5.0, 10.0] + [-float(i) for i in range(17)])


def test_fpr95_point_hand_case():
    fpr, tpr, thr = fpr95_point(SID, SOOD)
    assert (fpr, tpr, thr) == (0.15, 0.95, 2.0)
    assert ood_metrics(SID, SOOD)["fpr95"] == fpr  # the same figure as metrics.json
    d = roc_logfpr_data(SID, SOOD)
    assert d["fpr95"] == 0.15 and d["tpr95"] == 0.95 and d["n_id"] == d["n_ood"] == 20
    # the marked point lies on the drawn ROC curve (sklearn keeps it as a vertex)
    assert any(abs(f - 0.15) < 1e-12 and abs(t - 0.95) < 1e-12 for f, t in zip(d["fpr"], d["tpr"], strict=True))
    # OOD above every ID score but the lowest: no OOD kept at TPR 95 % -> FPR95 = 0 (drawn at the left edge)
    assert fpr95_point(SID, np.full(20, 1.5))[0] == 0.0
    # ties at the threshold keep every tied ID image: TPR of the point is then above 95 %
    sid = np.array([1.0, 1.0, 1.0] + list(range(4, 21)), dtype=float)
    assert fpr95_point(sid, SOOD) == (float(np.mean(SOOD >= 1.0)), 1.0, 1.0)


def test_fpr_floor():
    assert fpr_floor(4) == 1e-2 and fpr_floor(100) == pytest.approx(1e-3)
    assert fpr_floor(1000) == pytest.approx(1e-4) and fpr_floor(10_000) == pytest.approx(1e-4)
    assert fpr_floor(10_000, lowest=1e-6) == pytest.approx(1e-5)


def test_plot_roc_logfpr_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    curves = {"near": (SID, SOOD), "far": (rng.normal(1, 0.3, 500), rng.normal(0, 0.3, 2000))}
    p = plot_roc_logfpr(curves, tmp_path / "roc_logfpr.png")
    assert p == tmp_path / "roc_logfpr.png"
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (640, 520)  # 6.4 x (4.8 + 0.2 per curve) in at 100 dpi
    assert [f.name for f in tmp_path.iterdir()] == ["roc_logfpr.png"]  # atomic: no temp file left


def test_pick_queries():
    assert pick_queries(100, 6) == [0, 20, 40, 59, 79, 99]
    assert pick_queries(3, 6) == [0, 1, 2] and pick_queries(10, 0) == []


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 24), (20 * i, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def test_retrieval_examples_frames_and_size(tmp_path):
    n_img, texts = 8, [f"caption number {t}" for t in range(4)]
    gt = np.zeros((n_img, 4), dtype=bool)
    gt[np.arange(n_img), np.arange(n_img) % 4] = True  # image i shows caption i % 4
    sim = np.random.default_rng(0).uniform(0, 0.5, (n_img, 4))
    sim[0, 0], sim[1, 0] = 0.9, 0.8  # caption 0: rank 1 = image 0 (correct), rank 2 = image 1 (wrong)
    paths = _images(tmp_path, n_img)
    im = retrieval_examples(sim, gt, texts, paths, [texts[i % 4] for i in range(n_img)], n=2, k=5)
    assert im.size == retrieval_examples_size(n_img, 4, n=2, k=5)
    L = grid_layout(n_img, 4, 2, 5, 128)
    assert im.size[0] == 8 + (2 * 128 + 40) + 8 + 4 * (128 + 8 + 8)  # k = 4: only 4 captions exist
    y = L["head_h"] + 8 + 1  # one pixel into the frame of the first text query's row
    x0 = 8 + L["cap_w"] + 8 + 1
    assert im.getpixel((x0, y)) == GREEN and im.getpixel((x0 + L["cell"] + 8, y)) == RED
    assert retrieval_examples(sim, gt, texts, paths, n=6).size == retrieval_examples_size(n_img, 4, n=6)
    p = save_retrieval_examples(tmp_path / "out" / "top5_examples.jpg", sim, gt, texts, paths)
    with Image.open(p) as saved:
        assert saved.format == "JPEG" and saved.size == retrieval_examples_size(n_img, 4)
    with pytest.raises(ValueError, match="do not agree"):
        retrieval_examples(sim, gt, texts[:3], paths)
