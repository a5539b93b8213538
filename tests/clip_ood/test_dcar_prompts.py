"""DCAR prompt learner: exactness with prompts disabled, CoOp init, shapes, only prompts trainable."""

import pytest
import torch

from clip_ood.encoders import TINY_CONFIG, load_encoder, register_model_config

CUSTOM_CONFIG = {**TINY_CONFIG, "custom_text": True,
                 "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 2}}
TEXTS = ["a red seven digit on a brick background", "a photo", "x"]


@pytest.fixture(scope="module", params=["clip", "custom_text"])
def encoder(request):
    name = f"negvision-dcar-{request.param}"
    register_model_config(name, TINY_CONFIG if request.param == "clip" else CUSTOM_CONFIG)
    return load_encoder(name, device="cpu", seed=1)


def _learner(enc, **kw):
    from clip_ood.dcar.prompts import DualPromptCLIP

    return DualPromptCLIP(enc.model, enc.tokenizer, **kw)


def test_model_classes(encoder):
    import open_clip

    assert isinstance(encoder.model, (open_clip.CLIP, open_clip.CustomTextCLIP))


@torch.no_grad()
def test_disabled_prompts_reproduce_frozen_model_exactly(encoder):
    layers = len(encoder.model.visual.transformer.resblocks)
    m = _learner(encoder, n_ctx=4, n_vis=3, vis_depth=layers)
    images = torch.randn(2, 3, 32, 32)
    with m.disabled():
        t = m.encode_text(TEXTS)
        v = m.encode_image(images)
    assert torch.equal(t, encoder.model.encode_text(encoder.tokenizer(TEXTS)))
    assert torch.equal(v, encoder.model.encode_image(images))
    # n_ctx = 0 and no visual prompts: the same, with the learner enabled
    m0 = _learner(encoder, n_ctx=0)
    assert torch.equal(m0.encode_text(TEXTS), encoder.model.encode_text(encoder.tokenizer(TEXTS)))
    # enabled prompts change both towers
    assert not torch.allclose(m.encode_text(TEXTS), t)
    assert not torch.allclose(m.encode_image(images), v)


@torch.no_grad()
def test_ctx_init_equals_frozen_prompt(encoder):
    m = _learner(encoder, ctx_init="a photo of a")
    assert m.n_ctx == 4 and m.ctx.shape == (1, 4, m.text_parts.width)
    got = m.encode_text(["seven", "red three"])
    want = encoder.model.encode_text(encoder.tokenizer(["a photo of a seven", "a photo of a red three"]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_shapes_class_specific_and_grads(encoder):
    cats = ["seven", "three"]
    m = _learner(encoder, n_ctx=2, class_specific=True, categories=cats, n_vis=2, vis_depth=1)
    assert m.ctx.shape[:2] == (2, 2) and m.vis_prompts.shape[:2] == (1, 2)
    with torch.no_grad():
        a = m.encode_text(["a digit", "a digit"], ["seven", "three"])
    assert not torch.allclose(a[0], a[1])  # different contexts per category
    with pytest.raises(KeyError, match="unknown category 'nine'"):
        m.encode_text(["a digit"], ["nine"])
    img, txt = m(torch.randn(2, 3, 32, 32), ["a digit", "b"], ["seven", None])
    assert img.shape == txt.shape == (2, 32)
    (img * txt).sum().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == {"ctx", "vis_prompts"}
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert set(m.state_dict()) == {"ctx", "vis_prompts", "attr_weights"}  # checkpoints hold only prompts
