"""PerpNegFluxPipeline on tiny random components: equal to diffusers' Flux where Perp-Neg reduces to (true) CFG, one
batched transformer call per step, the paper's formula by hand at one step, batches, chunking, the schnell refusal and
the extra-cost warning on guidance-distilled Flux."""

import logging

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffusion.perpneg.guidance import perpendicular_component
from diffusion.perpneg.pipeline_flux import PerpNegFluxPipeline
from diffusion.perpneg.tiny import make_tiny_flux_components

# 32x32 images -> 16x16 latents -> 64 packed tokens; 24 T5 tokens hold the test prompts
KW = dict(num_inference_steps=3, output_type="latent", max_sequence_length=24, height=32, width=32)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return make_tiny_flux_components(tmp_path_factory.mktemp("flux"))


def _pipe(cls, components, **replace):
    p = cls(**{**components, **replace})
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(components):
    return _pipe(PerpNegFluxPipeline, components)


@pytest.fixture(scope="module")
def stock(components):
    return _pipe(FluxPipeline, components)


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


def test_dev_style_equals_stock_flux_without_and_with_true_cfg(pipe, stock):
    # no negatives, no true CFG: diffusers' distilled Flux, bit for bit
    assert torch.equal(_run(pipe), _run(stock))
    assert torch.equal(_run(pipe, true_cfg_scale=4.0), _run(stock, true_cfg_scale=4.0))  # no negative_prompt: no CFG
    cfg = _run(stock, negative_prompt="blurry", true_cfg_scale=4.0)
    c = _Counter(pipe.transformer)
    ours = _run(pipe, negative_prompt="blurry", true_cfg_scale=4.0)
    c.h.remove()
    assert c.sizes == [2] * 3  # diffusers' two calls per step in one batched call
    torch.testing.assert_close(ours, cfg, atol=1e-5, rtol=1e-4)
    # zero weights: the same true CFG (uncond_prompt is diffusers' negative_prompt)
    torch.testing.assert_close(
        _run(pipe, uncond_prompt="blurry", negative_prompts=["a dog", "grass"], negative_weights=[0.0, 0.0],
             true_cfg_scale=4.0), cfg, atol=1e-5, rtol=1e-4)


def test_parallel_negative_and_zero_weight_reduce_to_true_cfg(pipe, stock):
    cfg = _run(stock, negative_prompt="", true_cfg_scale=3.0)  # the default unconditional text is ""
    torch.testing.assert_close(_run(pipe, negative_prompts="a red cat", negative_weights=[5.0], true_cfg_scale=3.0),
                               cfg, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(_run(pipe, negative_prompts="a blue dog", negative_weights=[3.0], true_cfg_scale=3.0),
                              cfg, atol=1e-3)
    # per-sample weights [K, batch]: weight 0 for the first prompt only -> its image is plain true CFG
    prompts, gens = ["a red cat", "a green tree"], lambda: [_g(0), _g(1)]
    both = pipe(prompts, generator=gens(), negative_prompts=[["a dog", "a car"]], negative_weights=[[0.0, 2.0]],
                true_cfg_scale=3.0, **KW).images
    plain = stock(prompts, generator=gens(), negative_prompt=["", ""], true_cfg_scale=3.0, **KW).images
    torch.testing.assert_close(both[:1], plain[:1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[1:], plain[1:], atol=1e-3)


def test_batch_of_prompts_equals_one_by_one(pipe):
    negs, w = ["a dog", ["grass", "a car"]], torch.tensor([[1.0, 0.5], [2.0, 1.0]])  # [K, batch]
    kw = dict(num_images_per_prompt=2, true_cfg_scale=3.0)
    c = _Counter(pipe.transformer)
    batch = pipe(["a red cat", "a green tree"], generator=[_g(i) for i in range(4)], negative_prompts=negs,
                 negative_weights=w, **KW, **kw).images
    c.h.remove()
    assert c.sizes == [4 * 4] * 3  # one call per step over [uncond, pos, neg1, neg2] x 4 images
    one = pipe("a red cat", generator=[_g(0), _g(1)], negative_prompts=["a dog", "grass"], negative_weights=w[:, 0],
               **KW, **kw).images
    two = pipe("a green tree", generator=[_g(2), _g(3)], negative_prompts=["a dog", "a car"],
               negative_weights=w[:, 1], **KW, **kw).images
    torch.testing.assert_close(batch, torch.cat([one, two]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_two_negatives_equal_separate_transformer_calls_and_the_formula(pipe, rescale):
    """Step 0 by hand: four separate transformer calls, v_u + s * (e_pos - sum_k w_k perp(e_k, e_pos)), Euler."""
    s, w, g = 4.0, [1.5, 0.5], 3.5
    x0 = torch.randn(1, 64, 16, generator=_g(3))  # packed latents: 8x8 tokens of 4 channels x 2x2
    seen = {}

    def keep(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {}

    pipe("a red cat", negative_prompts=["a dog", "grass"], negative_weights=w, latents=x0.clone(), true_cfg_scale=s,
         guidance_scale=g, guidance_rescale=rescale, callback_on_step_end=keep, **{**KW, "num_inference_steps": 2})
    sigmas, t = pipe.scheduler.sigmas, pipe.scheduler.timesteps[0]
    img_ids = pipe._prepare_latent_image_ids(1, 8, 8, x0.device, x0.dtype)
    with torch.no_grad():
        def v_of(prompt):
            e, pe, txt_ids = pipe.encode_prompt(prompt, None, max_sequence_length=24)
            return pipe.transformer(hidden_states=x0, timestep=t.expand(1) / 1000, guidance=torch.full([1], g),
                                    pooled_projections=pe, encoder_hidden_states=e, txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False)[0]

        v_u, v_pos, v_1, v_2 = map(v_of, ["", "a red cat", "a dog", "grass"])
    e_pos = v_pos - v_u
    guided = v_u + s * (e_pos - w[0] * perpendicular_component(v_1 - v_u, e_pos)
                        - w[1] * perpendicular_component(v_2 - v_u, e_pos))
    if rescale:
        guided = rescale_noise_cfg(guided, v_pos, guidance_rescale=rescale)
    expected = x0 + (sigmas[1] - sigmas[0]) * guided  # flow-matching Euler step
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-4)


def test_transformer_batch_size_chunks_give_the_same_output(pipe):
    kw = dict(negative_prompts=["a dog", "grass"], negative_weights=[1.0, 2.0], num_images_per_prompt=2,
              true_cfg_scale=3.0)
    full = _run(pipe, **kw)
    c = _Counter(pipe.transformer)
    chunked = _run(pipe, transformer_batch_size=3, **kw)
    c.h.remove()
    assert c.sizes == [3, 3, 2] * 3  # 8 samples per step in chunks of at most 3
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)


def test_extra_cost_warning_once_per_call_on_distilled_flux(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="negvision.perpneg"):
        _run(pipe, negative_prompts=["a dog", "grass"], true_cfg_scale=3.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "negvision.perpneg"]
    assert len(msgs) == 1 and "K + 2 = 4 transformer passes" in msgs[0] and "instead of 1" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="negvision.perpneg"):
        _run(pipe, negative_prompt="blurry", true_cfg_scale=3.0)  # diffusers' own true CFG: no Perp-Neg, no warning
    assert not [r for r in caplog.records if r.name == "negvision.perpneg"]


def test_non_distilled_base_runs_perpneg_as_a_cfg_model_without_warning(tmp_path, caplog):
    comps = make_tiny_flux_components(tmp_path, guidance_embeds=False)
    ours, stock = _pipe(PerpNegFluxPipeline, comps), _pipe(FluxPipeline, comps)
    with caplog.at_level(logging.WARNING, logger="negvision.perpneg"):
        out = _run(ours, negative_prompts=["a dog"], negative_weights=[0.0], true_cfg_scale=4.0)
    assert not [r for r in caplog.records if r.name == "negvision.perpneg"]
    torch.testing.assert_close(out, _run(stock, negative_prompt="", true_cfg_scale=4.0), atol=1e-5, rtol=1e-4)


def test_schnell_is_refused_with_one_clear_error(components, tmp_path):
    fixed_shift = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # schnell's scheduler
    schnell = _pipe(PerpNegFluxPipeline, make_tiny_flux_components(tmp_path, guidance_embeds=False),
                    scheduler=fixed_shift)
    with pytest.raises(ValueError, match="FLUX.1-schnell.*timestep-distilled.*assume_cfg_trained=True"):
        _run(schnell, negative_prompts=["a dog"], true_cfg_scale=3.0)
    assert _run(schnell).shape == (1, 64, 16)  # without negatives: diffusers' Flux, schnell included
    assert _run(schnell, negative_prompts=["a dog"], true_cfg_scale=3.0, assume_cfg_trained=True).shape == (1, 64, 16)
    named = _pipe(PerpNegFluxPipeline, components)
    named.register_to_config(_name_or_path="black-forest-labs/FLUX.1-schnell")  # as from_pretrained records it
    with pytest.raises(ValueError, match="schnell"):
        _run(named, negative_prompts=["a dog"])


def test_errors(pipe):
    with pytest.raises(ValueError, match="negative_prompt \\(singular\\) and negative_prompts \\(plural\\).*uncond_prompt"):
        _run(pipe, negative_prompt="blurry", negative_prompts=["a dog"])
    with pytest.raises(ValueError, match=">= 0"):
        _run(pipe, negative_prompts=["a dog"], negative_weights=[-1.0])
    for name in ("ip_adapter_image_embeds", "negative_ip_adapter_image"):
        with pytest.raises(NotImplementedError, match=name):
            _run(pipe, negative_prompts=["a dog"], **{name: [torch.zeros(1, 1, 8)]})


def test_precomputed_negatives_decode_and_save_load(pipe, tmp_path):
    e, pe, _ = pipe.encode_prompt("a dog", None, max_sequence_length=24)
    kw = dict(negative_weights=[2.0], true_cfg_scale=3.0)
    ref = _run(pipe, negative_prompts="a dog", **kw)
    torch.testing.assert_close(_run(pipe, negative_prompts_embeds=[e], negative_pooled_prompts_embeds=[pe], **kw), ref,
                               atol=1e-5, rtol=1e-4)
    img = pipe("a cat", negative_prompts="a dog", generator=_g(), **{**KW, "output_type": "np"}).images
    assert img.shape == (1, 32, 32, 3) and 0 <= img.min() and img.max() <= 1
    pipe.save_pretrained(tmp_path / "p")  # the in-memory T5 tokenizer round-trips through tokenizer.json
    loaded = PerpNegFluxPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(loaded, negative_prompts="a dog", **kw), ref, atol=1e-5, rtol=1e-4)
