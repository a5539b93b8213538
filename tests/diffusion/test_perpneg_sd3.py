"""PerpNegStableDiffusion3Pipeline on tiny random components: equal to diffusers' SD3 where Perp-Neg reduces to CFG,
one batched transformer call per step, the paper's formula by hand at one step, batches, chunking and errors."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffusion.perpneg.guidance import perpendicular_component
from diffusion.perpneg.pipeline_sd3 import PerpNegStableDiffusion3Pipeline
from diffusion.perpneg.tiny import make_tiny_sd3_components

KW = dict(num_inference_steps=3, output_type="latent", max_sequence_length=8, guidance_scale=5.0)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return make_tiny_sd3_components(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def pipe(components):
    p = PerpNegStableDiffusion3Pipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock(components):
    p = StableDiffusion3Pipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def _g(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def _run(p, prompt="a red cat", seed=0, **kw):
    return p(prompt, generator=_g(seed), **{**KW, **kw}).images


class _Counter:
    """Batch sizes of the transformer's calls."""

    def __init__(self, module):
        self.sizes = []
        self.h = module.register_forward_hook(lambda m, a, kw, out: self.sizes.append(kw["hidden_states"].shape[0]),
                                              with_kwargs=True)


def test_without_negatives_and_with_zero_weights_equals_stock_sd3(pipe, stock):
    ref = _run(stock)
    assert torch.equal(_run(pipe), ref)  # no negatives: diffusers' SD3 CFG, bit for bit
    torch.testing.assert_close(_run(pipe, negative_prompts=["a dog", "grass"], negative_weights=[0.0, 0.0]), ref,
                               atol=1e-5, rtol=1e-4)
    # uncond_prompt is diffusers' negative_prompt (the unconditional text)
    torch.testing.assert_close(_run(pipe, uncond_prompt="blurry", negative_prompts="a dog", negative_weights=[0.0]),
                               _run(stock, negative_prompt="blurry"), atol=1e-5, rtol=1e-4)
    # diffusers' skip-layer guidance is kept
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    torch.testing.assert_close(_run(pipe, negative_prompts="a dog", negative_weights=[0.0], **slg),
                               _run(stock, **slg), atol=1e-5, rtol=1e-4)


def test_parallel_negative_and_zero_weight_reduce_to_cfg_as_the_math_says(pipe, stock):
    cfg = _run(stock)
    # a negative equal to the prompt: e_neg = e_pos has no perpendicular part, whatever its weight
    torch.testing.assert_close(_run(pipe, negative_prompts=["a red cat"], negative_weights=[4.0]), cfg,
                               atol=1e-4, rtol=1e-3)
    moved = _run(pipe, negative_prompts=["a blue dog"], negative_weights=[3.0])
    assert not torch.allclose(moved, cfg, atol=1e-3)
    # per-sample weights [K, batch]: weight 0 for the first prompt only -> its images are plain CFG
    kw = dict(num_images_per_prompt=2)
    both = pipe(["a red cat", "a green tree"], generator=[_g(i) for i in range(4)], negative_prompts=[["a dog", "a car"]],
                negative_weights=[[0.0, 2.0]], **KW, **kw).images
    plain = stock(["a red cat", "a green tree"], generator=[_g(i) for i in range(4)], **KW, **kw).images
    torch.testing.assert_close(both[:2], plain[:2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[2:], plain[2:], atol=1e-3)


def test_batch_of_prompts_equals_one_by_one(pipe):
    negs, w = ["a dog", ["grass", "a car"]], torch.tensor([[1.0, 0.5], [2.0, 1.0]])  # [K, batch]
    c = _Counter(pipe.transformer)
    batch = pipe(["a red cat", "a green tree"], generator=[_g(i) for i in range(4)], num_images_per_prompt=2,
                 negative_prompts=negs, negative_weights=w, **KW).images
    c.h.remove()
    assert c.sizes == [4 * 4] * 3  # one call per step over [uncond, pos, neg1, neg2] x 4 images
    one = pipe("a red cat", generator=[_g(0), _g(1)], num_images_per_prompt=2, negative_prompts=["a dog", "grass"],
               negative_weights=w[:, 0], **KW).images
    two = pipe("a green tree", generator=[_g(2), _g(3)], num_images_per_prompt=2, negative_prompts=["a dog", "a car"],
               negative_weights=w[:, 1], **KW).images
    torch.testing.assert_close(batch, torch.cat([one, two]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_two_negatives_equal_separate_transformer_calls_and_the_formula(pipe, rescale):
    """Step 0 by hand: four separate transformer calls, eps_u + s * (e_pos - sum_k w_k perp(e_k, e_pos)), Euler."""
    s, w = 6.0, [1.5, 0.5]
    x0 = torch.randn(1, 4, 16, 16, generator=_g(3))
    seen = {}

    def keep(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {}

    pipe("a red cat", negative_prompts=["a dog", "grass"], negative_weights=w, latents=x0.clone(), guidance_scale=s,
         guidance_rescale=rescale, num_inference_steps=2, output_type="latent", max_sequence_length=8,
         callback_on_step_end=keep)
    sigmas, t = pipe.scheduler.sigmas, pipe.scheduler.timesteps[0]
    dev = torch.device("cpu")
    with torch.no_grad():
        def enc(p):
            e, _, pe, _ = pipe.encode_prompt(p, None, None, dev, 1, False, max_sequence_length=8)
            return e, pe

        v = [pipe.transformer(hidden_states=x0, timestep=t.expand(1), encoder_hidden_states=e,
                              pooled_projections=pe, return_dict=False)[0]
             for e, pe in map(enc, ["", "a red cat", "a dog", "grass"])]
    v_u, v_pos, v_1, v_2 = v
    e_pos = v_pos - v_u
    guided = v_u + s * (e_pos - w[0] * perpendicular_component(v_1 - v_u, e_pos)
                        - w[1] * perpendicular_component(v_2 - v_u, e_pos))
    if rescale:
        guided = rescale_noise_cfg(guided, v_pos, guidance_rescale=rescale)
    expected = x0 + (sigmas[1] - sigmas[0]) * guided  # flow-matching Euler step
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-4)


def test_transformer_batch_size_chunks_give_the_same_output(pipe):
    kw = dict(negative_prompts=["a dog", "grass"], negative_weights=[1.0, 2.0], num_images_per_prompt=2)
    full = _run(pipe, **kw)
    c = _Counter(pipe.transformer)
    chunked = _run(pipe, transformer_batch_size=3, **kw)
    c.h.remove()
    assert c.sizes == [3, 3, 2] * 3  # 8 samples per step in chunks of at most 3
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)


def test_a_string_is_one_negative_and_decoded_images(pipe):
    c = _Counter(pipe.transformer)
    one = _run(pipe, negative_prompts="red")
    c.h.remove()
    assert c.sizes == [3] * 3  # [uncond, pos, "red"]: one negative, not "r", "e", "d"
    torch.testing.assert_close(one, _run(pipe, negative_prompts=["red"]))
    img = pipe("a cat", negative_prompts="a dog", num_inference_steps=2, max_sequence_length=8, output_type="np",
               generator=_g()).images
    assert img.shape == (1, 32, 32, 3) and 0 <= img.min() and img.max() <= 1


def test_precomputed_negative_embeddings_and_callback_sees_the_stacked_batch(pipe):
    e, _, pe, _ = pipe.encode_prompt("a dog", None, None, torch.device("cpu"), 1, False, max_sequence_length=8)
    shapes = []

    def cb(p, i, t, kw):
        shapes.append((kw["prompt_embeds"].shape[0], kw["pooled_prompt_embeds"].shape[0]))
        return {}

    out = _run(pipe, negative_prompts_embeds=[e], negative_pooled_prompts_embeds=[pe], callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"])
    torch.testing.assert_close(out, _run(pipe, negative_prompts=["a dog"]), atol=1e-5, rtol=1e-4)
    assert shapes == [(3, 3)] * 3
    with pytest.raises(ValueError, match="negative_pooled_prompts_embeds"):
        _run(pipe, negative_prompts_embeds=[e])


def test_errors(pipe):
    with pytest.raises(ValueError, match="negative_prompt \\(singular\\) and negative_prompts \\(plural\\).*uncond_prompt"):
        _run(pipe, negative_prompt="blurry", negative_prompts=["a dog"])
    with pytest.raises(ValueError, match=">= 0"):
        _run(pipe, negative_prompts=["a dog"], negative_weights=[-1.0])
    with pytest.raises(NotImplementedError, match="ip_adapter_image_embeds"):
        _run(pipe, negative_prompts=["a dog"], ip_adapter_image_embeds=torch.zeros(1, 1, 8))


def test_cfg_cutoff_callback_as_in_diffusers_without_negatives_and_an_error_with_them(pipe, stock):
    from diffusers.callbacks import SD3CFGCutoffCallback

    cut = lambda: SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)  # noqa: E731
    cut_off = _run(pipe, callback_on_step_end=cut())
    torch.testing.assert_close(cut_off, _run(stock, callback_on_step_end=cut()))
    assert not torch.allclose(cut_off, _run(pipe), atol=1e-3)  # CFG really stopped after step 1
    with pytest.raises(ValueError, match="SD3CFGCutoffCallback"):
        _run(pipe, negative_prompts=["a dog"], callback_on_step_end=cut())


def test_save_and_from_pretrained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    # without T5, as diffusers documents for SD3: text_encoder_3=None, tokenizer_3=None
    loaded = PerpNegStableDiffusion3Pipeline.from_pretrained(tmp_path / "p", text_encoder_3=None, tokenizer_3=None)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(negative_prompts=["a dog"], negative_weights=[2.0])
    torch.testing.assert_close(_run(loaded, **kw), _run(pipe, **kw), atol=1e-5, rtol=1e-4)
