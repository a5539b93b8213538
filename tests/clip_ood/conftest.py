"""Shared fixtures for clip_ood tests: one tiny random open_clip model (offline), saved as a local-dir too."""

import json

import pytest


@pytest.fixture(scope="session")
def tiny_encoder():
    from clip_ood.encoders import TINY_CONFIG, load_encoder, register_model_config

    register_model_config("negvision-tiny-test", TINY_CONFIG)
    return load_encoder("negvision-tiny-test", device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_encoder):
    """An open_clip ``local-dir:`` folder (open_clip_config.json + open_clip_model.safetensors)."""
    from safetensors.torch import save_file

    from clip_ood.encoders import TINY_CONFIG

    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    sd = {k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    return d


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory):
    """ID class folders (red-ish 'apple', green-ish 'leaf') and an OOD folder (noise), small PNGs."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("ood_images")
    rng = np.random.default_rng(0)
    for cls, color in (("apple", (200, 30, 30)), ("leaf", (30, 180, 40))):
        (root / "id" / cls).mkdir(parents=True)
        for i in range(4):
            a = np.clip(np.array(color) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype("uint8")
            Image.fromarray(a).save(root / "id" / cls / f"{i}.png")
    for name in ("noise", "dark"):
        (root / name).mkdir()
        for i in range(4):
            a = rng.integers(0, 255 if name == "noise" else 40, (24, 24, 3)).astype("uint8")
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root
