"""The embedded digits sample set: determinism, classes, object counts, tight in-image boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vision.data import (
    load_backgrounds,
    load_detection_dataset,
    load_mnist_digits,
    make_digits,
    render_sample,
)


def test_mnist_and_backgrounds_load_offline() -> None:
    digits, labels = load_mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    backgrounds = load_backgrounds()
    assert len(backgrounds) >= 5
    assert all(b.ndim == 3 and b.shape[2] == 3 and b.dtype == np.uint8 for b in backgrounds)


def test_make_digits_is_deterministic(tmp_path: Path) -> None:
    a = make_digits(tmp_path / "a", "coco", n_train=4, n_val=2, img_size=64, seed=7)
    b = make_digits(tmp_path / "b", "coco", n_train=4, n_val=2, img_size=64, seed=7)
    c = make_digits(tmp_path / "c", "coco", n_train=4, n_val=2, img_size=64, seed=8)
    for rel in (
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        "images/train/train_00003.jpg",
    ):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "annotations/instances_train.json").read_bytes() != (
        c / "annotations/instances_train.json"
    ).read_bytes()


def test_make_digits_dataset_contents(tmp_path: Path) -> None:
    root = make_digits(tmp_path, "yolo", n_train=10, n_val=2, img_size=128, seed=1)
    ds = load_detection_dataset(root)
    assert ds.classes == [str(d) for d in range(10)] and len(ds) == 10
    for i in range(len(ds)):
        boxes, labels = ds.annotations(i)
        assert 1 <= len(labels) <= 8
        assert ((labels >= 0) & (labels <= 9)).all()
        assert (boxes >= 0).all() and (boxes <= 128).all()
        heights = boxes[:, 3] - boxes[:, 1]
        assert (heights >= 0.04 * 128).all() and (heights <= 0.41 * 128).all()


def test_make_digits_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        make_digits(tmp_path, "pascal")
    with pytest.raises(ValueError, match="min_objects"):
        make_digits(tmp_path, min_objects=3, max_objects=2)


def test_render_sample_boxes_are_tight_around_ink() -> None:
    digits, labels = load_mnist_digits()
    backgrounds = load_backgrounds()
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(12):
        s = render_sample(rng, digits, labels, backgrounds, img_size=128)
        counts.append(len(s.labels))
        assert s.image.shape == s.background.shape == (128, 128, 3)
        assert s.boxes.shape == (len(s.labels), 4) and np.array_equal(s.boxes, np.round(s.boxes))
        diff = np.abs(s.image.astype(np.int32) - s.background.astype(np.int32)).sum(axis=2)
        changed = np.zeros(diff.shape, bool)
        for x1, y1, x2, y2 in s.boxes.astype(int):
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            inside = diff[y1:y2, x1:x2]
            assert inside.mean() > 10  # the box holds visible ink
            # tight: the ink reaches every edge of the box
            for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
                assert edge.max() > 8
            changed[y1:y2, x1:x2] = True
        if (~changed).any():  # outside the boxes only faint anti-aliased edges (alpha < threshold) remain
            assert diff[~changed].mean() < 0.1 * max(float(diff[changed].mean()), 1.0)
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) > 1


def test_render_sample_is_deterministic() -> None:
    digits, labels = load_mnist_digits()
    backgrounds = load_backgrounds()
    a = render_sample(np.random.default_rng(5), digits, labels, backgrounds, img_size=96)
    b = render_sample(np.random.default_rng(5), digits, labels, backgrounds, img_size=96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.labels, b.labels)
