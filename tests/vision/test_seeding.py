"""vision.seeding: the per-sample seed formula, albumentations draws that depend on the sample seed only, the
deterministic switch, and the engine's handling of both."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vision.seeding import sample_seed, seed_albumentations, seed_everything, use_deterministic


def test_sample_seed_formula_hand_checked():
    assert sample_seed(0, 0, 0) == 0
    assert sample_seed(0, 0, 7) == 7
    assert sample_seed(0, 1, 0) == 10_000_019
    assert sample_seed(1, 0, 0) == 1_000_003 * 10_000_019
    assert sample_seed(2, 3, 5) == (2 * 1_000_003 + 3) * 10_000_019 + 5
    assert 0 <= sample_seed(2**62, 2**20, 2**30) < 2**63
    # distinct for neighbouring epochs / indices / seeds
    assert len({sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}) == 450


def test_seed_everything_fixes_every_global_generator():
    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_albumentations_draws_follow_the_sample_seed_only():
    import albumentations as A

    from vision.data import build_detection_transforms

    tf = build_detection_transforms(True, img_size=32)
    img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    boxes = np.array([[2, 3, 20, 30]], dtype=np.float32)

    def draw(seed):
        seed_albumentations(tf, seed)
        out = tf(image=img, bboxes=boxes, labels=np.array([1]))
        return out["image"], np.asarray(out["bboxes"])

    a = draw(11)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    draw(12)  # another sample in between, global generators moved
    b = draw(11)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outs = {draw(s)[0].tobytes() for s in range(8)}
    assert len(outs) > 1  # different samples get different draws
    # one stream shared by the pipeline's transforms (Compose.set_random_seed would give each the same seed)
    flip = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seen = set()
    for s in range(40):
        seed_albumentations(flip, s)
        x = np.arange(4, dtype=np.uint8).reshape(2, 2)
        seen.add(flip(image=x)["image"].tobytes())
    assert len(seen) == 4  # h only and v only happen too: the two flips are not drawn in lockstep
    with pytest.raises(TypeError, match="not an albumentations transform"):
        seed_albumentations(lambda **kw: kw, 0)


def test_detection_dataset_augmentation_depends_on_seed_epoch_index(tmp_path):
    from vision.data import build_detection_transforms, load_detection_dataset
    from vision.data.digits import make_digits

    make_digits(tmp_path, format="yolo", n_train=3, n_val=1, img_size=48, seed=0)
    ds = load_detection_dataset(tmp_path, "train", transforms=build_detection_transforms(True, img_size=48),
                                progress=False)
    ds.augment_seed = 4
    first = [ds[i][0] for i in (0, 1, 2)]
    again = ds[2][0], ds[0][0]  # another order
    assert torch.equal(again[0], first[2]) and torch.equal(again[1], first[0])
    ds.set_epoch(1)
    assert not all(torch.equal(ds[i][0], first[i]) for i in range(3))  # a new epoch, new draws
    ds.set_epoch(0)
    assert torch.equal(ds[1][0], first[1])


def test_use_deterministic_switches_torch_and_the_engine_restores_it(tmp_path):
    from torch import nn

    from vision.engine import TrainConfig, Trainer

    assert not torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    finally:
        use_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()

    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))

    def fit(out, deterministic):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        cfg = TrainConfig(out_dir=str(out), batch_size=4, epochs=2, lr=0.1, device="cpu", progress=False,
                          deterministic=deterministic)
        seen = []
        tr = Trainer(model, data, cfg, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                     callbacks=[lambda t, ev, info: seen.append(torch.are_deterministic_algorithms_enabled())
                                if ev == "step_end" else None])
        tr.fit()
        return tr.unwrapped_model.weight.detach().clone(), seen

    w_det, seen = fit(tmp_path / "det", True)
    assert seen and all(seen)  # on while training
    assert not torch.are_deterministic_algorithms_enabled()  # and off again after
    w, _ = fit(tmp_path / "default", False)
    assert torch.equal(w, w_det)  # on the CPU the kernels are deterministic anyway
