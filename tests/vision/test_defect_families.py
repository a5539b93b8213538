"""Defect families of the sample generator: marks unchanged, local and global texture-statistics defects, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from vision.cli import app
from vision.data.defects import (
    FAMILIES,
    GLOBAL_TEXTURE_DEFECTS,
    LOCAL_TEXTURE_DEFECTS,
    STOCHASTIC_TEXTURES,
    make_defects,
    render_global_texture_sample,
    render_local_texture_sample,
)

runner = CliRunner()

# sha256 over (relative path, decoded pixel bytes) of every PNG of a split in sorted path order, then its
# labels.csv bytes. Obtained by running _split_digest on the output of the code before the families were added
# (commit 85704c9, vision/data/defects.py untouched): the marks family must keep producing exactly these images.
# Decoded pixels rather than PNG bytes, so that another zlib/Pillow build cannot change the digest.
MARKS_DIGESTS = {
    # make_defects(d, n_train=12, n_test=6, img_size=32, seed=3)
    ("a", "train"): "b16d0065e5e5dd1b51da8f839da0cda1a62fba31086573e2cf54ffee4839b1f6",
    ("a", "test"): "39352d052bab764a0115038cf0747086d797a1b749ec7b086a5b751ccbc20082",
    # make_defects(d, n_train=8, n_test=0, img_size=40, seed=11, defect_fraction=1.0): every defect type
    ("b", "train"): "8bbfa3a669ec3dbdbdff88c02fa871a7a236d0c08e48ec9dba7200057aa284fd",
}


def _split_digest(out: Path, split: str) -> str:
    h = hashlib.sha256()
    for p in sorted((out / split).rglob("*.png")):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    h.update((out / split / "labels.csv").read_bytes())
    return h.hexdigest()


def _rows(out: Path, split: str) -> list[dict]:
    with open(out / split / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------------------------- marks


def test_marks_is_the_default_and_unchanged(tmp_path):
    omitted = make_defects(tmp_path / "omitted", n_train=12, n_test=6, img_size=32, seed=3)
    marks = make_defects(tmp_path / "marks", n_train=12, n_test=6, img_size=32, seed=3, family="marks")
    for split in ("train", "test"):
        assert _split_digest(omitted, split) == _split_digest(marks, split) == MARKS_DIGESTS[("a", split)]
    b = make_defects(tmp_path / "b", n_train=8, n_test=0, img_size=40, seed=11, defect_fraction=1.0)
    assert _split_digest(b, "train") == MARKS_DIGESTS[("b", "train")]
    assert json.loads((marks / "info.json").read_text())["family"] == "marks"


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("family,kinds", [("local_texture", LOCAL_TEXTURE_DEFECTS),
                                          ("global_texture", GLOBAL_TEXTURE_DEFECTS)])
def test_texture_family_layout(tmp_path, family, kinds):
    out = make_defects(tmp_path / family, n_train=8, n_test=4, img_size=32, seed=5, defect_fraction=0.5,
                       family=family)
    info = json.loads((out / "info.json").read_text())
    assert info["family"] == family and info["defects"] == list(kinds)
    assert info["textures"] == list(STOCHASTIC_TEXTURES)
    n_pos = 0
    for split in ("train", "test"):
        rows = _rows(out, split)
        assert list(rows[0]) == ["image", "label", "segmented", "texture", "defect"]
        assert len(rows) == info["splits"][split]["images"]
        for r in rows:
            img = _png(out / split / "images" / r["image"])
            assert img.shape == (32, 32) and img.dtype == np.uint8
            assert r["texture"] in STOCHASTIC_TEXTURES
            mask_file = out / split / "masks" / r["image"]
            assert mask_file.is_file() == (r["label"] == "1")
            if r["label"] == "1":
                n_pos += 1
                assert r["defect"] in kinds
                m = _png(mask_file)
                assert m.shape == (32, 32) and set(np.unique(m).tolist()) <= {0, 255}
                if family == "global_texture":
                    assert (m == 255).all()
                else:
                    assert 4 <= (m == 255).sum() < m.size
            else:
                assert r["defect"] == ""
    assert n_pos == info["splits"]["train"]["defective"] + info["splits"]["test"]["defective"] >= 4


def test_unknown_family_or_kind(tmp_path):
    with pytest.raises(ValueError, match="marks, local_texture, global_texture"):
        make_defects(tmp_path / "x", n_train=1, n_test=0, img_size=32, family="stripes")
    with pytest.raises(ValueError, match="orientation, scale, contrast, grain"):
        make_defects(tmp_path / "x", n_train=1, n_test=0, img_size=32, family="local_texture", defects=["scratch"])
    with pytest.raises(ValueError, match="unknown texture"):
        make_defects(tmp_path / "x", n_train=1, n_test=0, img_size=32, family="global_texture", textures=["brick"])
    assert FAMILIES == ("marks", "local_texture", "global_texture")


# ----------------------------------------------------------------------------------------------- statistics


def _pair(render, i: int, texture: str, kind: str, size: int = 48):
    """(defect-free image, defective image, mask) drawn from the same generator state."""
    base, *_ = render(np.random.default_rng([7, 0, i]), size, False, texture)
    img, mask, tex, defect = render(np.random.default_rng([7, 0, i]), size, True, texture, kind)
    assert (tex, defect) == (texture, kind)
    return base.astype(np.float64), img.astype(np.float64), mask


@pytest.mark.parametrize("kind", LOCAL_TEXTURE_DEFECTS)
def test_local_texture_keeps_the_mean_and_changes_the_texture(kind):
    in_base, in_out, changes = [], [], []
    for i, texture in enumerate(STOCHASTIC_TEXTURES):
        base, img, m = _pair(render_local_texture_sample, i, texture, kind)
        assert 4 <= m.sum() <= 0.5 * m.size
        far = ~ndimage.binary_dilation(m, iterations=3)
        assert np.array_equal(img[far], base[far])  # only the region (and its soft edge) changes
        in_base.append(img[m].mean() - base[m].mean())
        in_out.append(img[m].mean() - img[~m].mean() - (base[m].mean() - base[~m].mean()))
        changes.append(np.abs(img - base)[m].mean() / base[m].std())
        if kind == "contrast":  # the region's std moves by a large factor
            changes[-1] = abs(np.log(img[m].std() / base[m].std()))
        if kind in ("grain", "scale"):  # fine structure: Laplacian energy in the region
            changes[-1] = abs(np.log(ndimage.laplace(img)[m].var() / ndimage.laplace(base)[m].var()))
    # no mark: the region's mean is the defect-free image's mean there (grey levels, rounding aside)
    assert max(abs(d) for d in in_base) < 2.5
    assert abs(np.mean(in_out)) < 1.0
    # but its texture differs measurably
    assert min(changes) > 0.25, changes


def test_global_texture_keeps_the_mean_and_shifts_the_statistics():
    for kind in GLOBAL_TEXTURE_DEFECTS:
        for i, texture in enumerate(STOCHASTIC_TEXTURES[:3]):
            base, img, m = _pair(render_global_texture_sample, i, texture, kind, size=40)
            assert m.all()
            assert abs(img.mean() - base.mean()) < 0.1
            assert np.abs(img - base).mean() > 0.05 * base.std()
    base, img, _ = _pair(render_global_texture_sample, 0, "noise", "contrast", size=40)
    assert 0.7 < img.std() / base.std() < 1.35 and abs(np.log(img.std() / base.std())) > 0.1  # slight, not a mark
    for texture in ("fabric", "grass"):  # added grain: more Laplacian energy
        base, img, _ = _pair(render_global_texture_sample, 0, texture, "grain", size=40)
        assert ndimage.laplace(img).var() > 1.1 * ndimage.laplace(base).var()


# ----------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", ["local_texture", "global_texture"])
def test_texture_family_deterministic_and_prefix_stable(tmp_path, family):
    a = make_defects(tmp_path / "a", n_train=6, n_test=2, img_size=32, seed=2, family=family)
    b = make_defects(tmp_path / "b", n_train=6, n_test=2, img_size=32, seed=2, family=family)
    c = make_defects(tmp_path / "c", n_train=3, n_test=0, img_size=32, seed=2, family=family)
    d = make_defects(tmp_path / "d", n_train=3, n_test=0, img_size=32, seed=9, family=family)
    for split in ("train", "test"):
        assert _split_digest(a, split) == _split_digest(b, split)
    for i in range(3):  # sample i does not depend on the set size
        name = f"train_{i:04d}.png"
        assert np.array_equal(_png(a / "train" / "images" / name), _png(c / "train" / "images" / name))
    assert _rows(a, "train")[:3] == _rows(c, "train")
    assert not all(np.array_equal(_png(c / "train" / "images" / f"train_{i:04d}.png"),
                                  _png(d / "train" / "images" / f"train_{i:04d}.png")) for i in range(3))


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_family_end_to_end(tmp_path):
    out = tmp_path / "set"
    r = runner.invoke(app, ["data", "make-defects", "--out", str(out), "--n-train", "4", "--n-test", "2",
                            "--img-size", "32", "--defect-fraction", "0.5", "--family", "global_texture"])
    assert r.exit_code == 0, r.output
    assert "global_texture" in r.output
    assert json.loads((out / "info.json").read_text())["family"] == "global_texture"
    rows = _rows(out, "train")
    assert len(rows) == 4 and {x["defect"] for x in rows if x["label"] == "1"} <= set(GLOBAL_TEXTURE_DEFECTS)


def test_cli_bad_family_is_a_usage_error(tmp_path):
    r = runner.invoke(app, ["data", "make-defects", "--out", str(tmp_path / "x"), "--family", "stripes"])
    assert r.exit_code == 2
    for name in FAMILIES:
        assert name in r.output
    assert not (tmp_path / "x").exists()
