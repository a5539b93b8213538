"""PerpNegStableDiffusionPipeline on tiny random components: batched call count, equality with a sequential
reference, plain-CFG equivalence, guidance_rescale, callbacks, schedulers, save/load."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffusion.perpneg import perp_neg_guidance
from diffusion.perpneg.pipeline import PerpNegStableDiffusionPipeline
from diffusion.perpneg.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _latents(n, seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class _Counter:
    def __init__(self, module):
        self.calls, self.sizes = 0, []
        self.h = module.register_forward_hook(self)

    def __call__(self, mod, args, out):
        self.calls += 1
        self.sizes.append(args[0].shape[0])


@torch.no_grad()
def _sequential_reference(pipe, prompts, negs, weights, nipp, latents, steps, scale, rescale=0.0):
    """The official scheme: one UNet call per prompt per step, then Perp-Neg (per sample)."""
    dev = torch.device("cpu")
    enc = lambda p: pipe.encode_prompt(p, dev, nipp, False)[0]  # noqa: E731
    e_u, e_p = enc([""] * len(prompts)), enc(prompts)
    e_n = [enc([n] * len(prompts)) for n in negs]
    pipe.scheduler.set_timesteps(steps)
    x = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        xin = pipe.scheduler.scale_model_input(x, t)
        eu = pipe.unet(xin, t, encoder_hidden_states=e_u).sample
        ep = pipe.unet(xin, t, encoder_hidden_states=e_p).sample
        en = torch.stack([pipe.unet(xin, t, encoder_hidden_states=e).sample for e in e_n])
        eps = perp_neg_guidance(eu, ep, en, weights, scale)
        if rescale:
            eps = rescale_noise_cfg(eps, ep, guidance_rescale=rescale)
        x = pipe.scheduler.step(eps, t, x).prev_sample
    return x


def test_one_batched_unet_call_per_step_and_matches_sequential(pipe):
    prompts, negs, w = ["a cat", "a house"], ["a dog", "grass"], [1.0, 0.5]
    lat = _latents(4)
    c = _Counter(pipe.unet)
    out = pipe(prompts, negative_prompts=negs, negative_weights=w, num_images_per_prompt=2, num_inference_steps=2,
               latents=lat, output_type="latent", guidance_scale=6.0).images
    c.h.remove()
    assert c.calls == 2 and c.sizes == [4 * 4, 4 * 4]  # [uncond, pos, neg1, neg2] x (2 prompts x 2 images)
    ref = _sequential_reference(pipe, prompts, negs, w, 2, lat, 2, 6.0)
    assert torch.allclose(out, ref, atol=1e-4)


def test_chunked_unet_calls_give_same_result(pipe):
    lat = _latents(2)
    kw = dict(negative_prompts=["a dog"], num_inference_steps=2, latents=lat, output_type="latent")
    full = pipe(["a cat", "a cow"], **kw).images
    c = _Counter(pipe.unet)
    chunked = pipe(["a cat", "a cow"], unet_batch_size=4, **kw).images
    c.h.remove()
    assert c.calls == 2 * 2 and max(c.sizes) <= 4
    assert torch.allclose(full, chunked, atol=1e-4)


def test_zero_weights_equal_plain_cfg_of_stable_diffusion(pipe):
    lat = _latents(2)
    base = StableDiffusionPipeline(**pipe.components)
    base.set_progress_bar_config(disable=True)
    ref = base(["a cat", "a cow"], num_inference_steps=2, latents=lat, output_type="latent").images
    out0 = pipe(["a cat", "a cow"], num_inference_steps=2, latents=lat, output_type="latent").images
    outw = pipe(["a cat", "a cow"], negative_prompts=["a dog"], negative_weights=[0.0], num_inference_steps=2,
                latents=lat, output_type="latent").images
    assert torch.allclose(out0, ref, atol=1e-5)
    assert torch.allclose(outw, ref, atol=1e-4)


def test_guidance_rescale_matches_reference(pipe):
    lat = _latents(1)
    kw = dict(negative_prompts=["a dog"], negative_weights=[1.5], num_inference_steps=2, latents=lat,
              output_type="latent", guidance_scale=9.0)
    out = pipe("a cat", guidance_rescale=0.7, **kw).images
    plain = pipe("a cat", **kw).images
    ref = _sequential_reference(pipe, ["a cat"], ["a dog"], [1.5], 1, lat, 2, 9.0, rescale=0.7)
    assert torch.allclose(out, ref, atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_euler_scheduler_matches_reference(pipe):
    p2 = PerpNegStableDiffusionPipeline(**{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config)})
    p2.set_progress_bar_config(disable=True)
    lat = _latents(1)
    out = p2("a cat", negative_prompts=["a dog"], num_inference_steps=2, latents=lat, output_type="latent").images
    ref = _sequential_reference(p2, ["a cat"], ["a dog"], [1.0], 1, lat, 2, 7.5)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_callback_on_step_end_sees_and_edits_latents(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, kw["latents"].shape))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe("a cat", negative_prompts=["a dog"], num_inference_steps=2, output_type="latent",
               callback_on_step_end=cb, generator=torch.Generator().manual_seed(0)).images
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == (1, 4, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_extra_positives_and_per_sample_weights_and_images(pipe):
    out = pipe(["a cat", "a cow"], positive_prompts=["red"], positive_weights=[0.5], negative_prompts=["a dog"],
               negative_weights=torch.tensor([[1.0, 0.0]]), num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 16, 16, 3) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError):
        pipe("a cat", negative_prompts=["a dog"], negative_weights=[-1.0], num_inference_steps=1)


def test_save_and_from_pretrained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = PerpNegStableDiffusionPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    lat = _latents(1)
    kw = dict(negative_prompts=["a dog"], num_inference_steps=2, latents=lat, output_type="latent")
    assert torch.allclose(loaded("a cat", **kw).images, pipe("a cat", **kw).images, atol=1e-5)


def test_a_string_is_one_negative_prompt(pipe):
    lat = _latents(1)
    kw = {"num_inference_steps": 2, "latents": lat, "output_type": "latent", "guidance_scale": 6.0}
    c = _Counter(pipe.unet)
    one = pipe("a cat", negative_prompts="red", **kw).images
    c.h.remove()
    assert c.sizes == [3, 3]  # [uncond, pos, "red"]: one negative, not "r", "e", "d"
    assert torch.allclose(one, pipe("a cat", negative_prompts=["red"], **kw).images)


def test_negative_prompt_and_negative_prompts_together_is_an_error(pipe):
    kw = {"num_inference_steps": 1, "latents": _latents(1), "output_type": "latent", "guidance_scale": 6.0}
    with pytest.raises(ValueError, match="negative_prompt \\(singular\\) and negative_prompts \\(plural\\).*uncond_prompt"):
        pipe("a cat", negative_prompt="blurry", negative_prompts=["a dog"], **kw)
    alone = pipe("a cat", negative_prompt="blurry", **kw).images  # alone: diffusers' meaning, unchanged
    ref = StableDiffusionPipeline(**{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                   "scheduler")}, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert torch.allclose(alone, ref("a cat", negative_prompt="blurry", **kw).images, atol=1e-5)
    # the unconditional text on purpose, with Perp-Neg negatives: uncond_prompt (= its embeddings passed directly)
    emb = pipe.encode_prompt("blurry", torch.device("cpu"), 1, False)[0]
    got = pipe("a cat", uncond_prompt="blurry", negative_prompts=["a dog"], **kw).images
    want = pipe("a cat", negative_prompt_embeds=emb, negative_prompts=["a dog"], **kw).images
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        pipe("a cat", uncond_prompt="x", negative_prompt="y", **kw)
