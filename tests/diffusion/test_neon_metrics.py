"""FID from features, k-NN precision/recall, feature extractors, reference image folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.neon.metrics import (
    PixelFeatures,
    compute_features,
    fid_from_features,
    load_feature_extractor,
    load_image_folder,
    precision_recall,
)


def test_fid_zero_for_identical_and_mean_shift_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    m = torch.tensor([1.0, -2.0, 0.5, 0.0])
    # same covariance: FID = |mu1 - mu2|^2
    assert fid_from_features(a, a + m) == pytest.approx(float(m @ m), rel=1e-6)


def test_fid_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 2))
    b = rng.normal(size=(20000, 2)) * 2.0
    # N(0, I) vs N(0, 4I): trace(I + 4I - 2 * 2I) = 2 * (1 + 4 - 4) = 2
    assert fid_from_features(a, b) == pytest.approx(2.0, rel=0.05)


def test_fid_errors():
    with pytest.raises(ValueError, match="feature sizes"):
        fid_from_features(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 2)), np.zeros((5, 2)))


def test_precision_recall_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 2, generator=g)
    p, r = precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    collapsed = 0.05 * torch.randn(300, 2, generator=g)  # all samples in one small region of the real support
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.3


def test_feature_extractor_specs(tmp_path):
    x = torch.rand(6, 1, 16, 16)
    f = load_feature_extractor("pixels:4")
    assert isinstance(f, PixelFeatures) and compute_features(f, x, batch_size=4).shape == (6, 16)
    f = load_feature_extractor("diffusion.neon.metrics:PixelFeatures")  # module:factory
    assert compute_features(f, x).shape == (6, 64)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    prog = torch.export.export(net.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(prog, str(tmp_path / "feat.pt2"))
    f = load_feature_extractor(f"export:{tmp_path / 'feat.pt2'}")
    assert compute_features(f, x, batch_size=4).shape == (6, 3)
    custom = lambda imgs: imgs.mean(dim=(2, 3))  # noqa: E731
    assert load_feature_extractor(custom) is custom


def test_missing_weights_error_names_file(tmp_path):
    for kind in ("inception", "export", "torchscript", "torch-fidelity"):
        with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
            load_feature_extractor(f"{kind}:{tmp_path / 'missing.pth'}")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_feature_extractor("bogus")


def test_bad_feature_spec_is_a_spec_error():
    from diffusion.neon.metrics import FeatureSpecError

    for spec in ("bogus", "pixels:abc", "pixels:0", "no_such_module_xyz:factory"):
        with pytest.raises(FeatureSpecError):
            load_feature_extractor(spec)


def test_load_image_folder(tmp_path):
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((10, 12, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    x = load_image_folder(tmp_path, size=(8, 8), channels=1)
    assert x.shape == (3, 1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        load_image_folder(tmp_path / "empty")


def test_load_image_folder_applies_exif_orientation(tmp_path):
    """A phone JPEG tagged 'rotate 90' is read as displayed (H and W swapped), like every other image reader."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((10, 16, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image_folder(tmp_path).shape == (1, 3, 16, 10)
