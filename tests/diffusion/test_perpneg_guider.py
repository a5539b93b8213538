"""PerpNegGuidance, the diffusers guider: the paper's formula on hand-made predictions, diffusers' CFG when there are
no negatives, its config round trip, and the modular SDXL pipeline against the stock guider and the classic
Perp-Neg SDXL pipeline (tiny components, offline)."""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import stable_diffusion_xl

from diffusion.perpneg.guidance import perpendicular_component
from diffusion.perpneg.guider import PerpNegGuidance, perp_neg_blocks
from diffusion.perpneg.pipeline_xl import PerpNegStableDiffusionXLPipeline
from diffusion.perpneg.tiny import make_tiny_sdxl_components

pytestmark = pytest.mark.filterwarnings("ignore")


def _slots(g: PerpNegGuidance, preds: dict[str, torch.Tensor]):
    from diffusers.modular_pipelines import BlockState

    return [BlockState(noise_pred=v, __guidance_identifier__=k) for k, v in preds.items()]


def test_forward_is_the_papers_formula_per_sample():
    torch.manual_seed(0)
    u, c, n1, n2 = (torch.randn(3, 4, 5, 5) for _ in range(4))
    g = PerpNegGuidance(guidance_scale=6.0)
    g.set_negatives([{"x": torch.zeros(1)}, {"x": torch.zeros(1)}], weights=[[1.0, 0.5, 0.0], [2.0, 0.0, 1.0]])
    out = g(_slots(g, {"pred_cond": c, "pred_uncond": u, "pred_neg_0": n1, "pred_neg_1": n2})).pred
    w = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 1.0]])
    for b in range(3):  # eps_u + s * (e_pos - sum_k w_k perp(e_k, e_pos)), by hand per sample
        e = c[b] - u[b]
        want = u[b] + 6.0 * (e - sum(w[k, b] * perpendicular_component((n - u)[b : b + 1], e[None])[0]
                                     for k, n in enumerate((n1, n2))))
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def test_no_negatives_is_diffusers_cfg_and_a_parallel_negative_changes_nothing():
    torch.manual_seed(1)
    u, c = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for rescale in (0.0, 0.7):
        cfg = ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=rescale)
        pn = PerpNegGuidance(guidance_scale=4.0, guidance_rescale=rescale)
        want = cfg.forward(c, u).pred
        torch.testing.assert_close(pn.forward(c, u).pred, want)
        pn.set_negatives([{"x": torch.zeros(1)}], weights=[3.0])
        # a negative along the prompt's direction has no perpendicular part
        torch.testing.assert_close(pn.forward(c, u, pred_neg_0=u + 2.5 * (c - u)).pred, want, rtol=1e-5, atol=1e-5)


def test_slots_start_stop_and_enabled():
    g = PerpNegGuidance(guidance_scale=5.0, start=0.2, stop=0.8)
    g.set_negatives([{"x": torch.zeros(1)}] * 2)
    counts = []
    for i in range(10):
        g.set_state(step=i, num_inference_steps=10, timestep=torch.tensor(i))
        counts.append(g.num_conditions)
    assert counts == [1, 1] + [4] * 6 + [1, 1]
    g.disable()
    assert g.num_conditions == 1
    one = PerpNegGuidance(guidance_scale=1.0)
    assert one.num_conditions == 1  # s = 1 without negatives is the prompt's prediction
    one.set_negatives([{"x": torch.zeros(1)}])
    assert one.num_conditions == 3  # ... but still removes a negative


def test_inputs_per_slot_and_batch_expansion():
    g = PerpNegGuidance(guidance_scale=5.0)
    cond, unc, lat = torch.ones(4, 3, 2), torch.zeros(4, 3, 2), torch.randn(4, 1)
    neg = torch.full((2, 3, 2), 7.0)  # one row per prompt; 2 prompts x 2 images each
    neg[1] = 8.0
    g.set_negatives([{"emb": neg}])
    g.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(0))
    batches = g.prepare_inputs({"emb": (cond, unc), "latents": lat, "extra": (None, None)})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond", "pred_neg_0"]
    assert torch.equal(batches[0].emb, cond) and torch.equal(batches[1].emb, unc)
    assert batches[2].emb[:, 0, 0].tolist() == [7.0, 7.0, 8.0, 8.0]
    assert all(torch.equal(b.latents, lat) and b.extra is None for b in batches)
    g.set_negatives([{"embeds": neg}])  # a name the denoiser does not use is an error, not a silent no-op
    with pytest.raises(ValueError, match="'embeds' is not an input"):
        g.prepare_inputs({"emb": (cond, unc)})
    g.set_negatives([{"emb": neg}])
    with pytest.raises(ValueError, match="no unconditional inputs"):
        g.prepare_inputs({"emb": cond})
    g.set_negatives([{"emb": neg}], uncond={"emb": torch.zeros(1, 3, 2)})  # e.g. Flux: the guider brings it
    assert torch.equal(g.prepare_inputs({"emb": cond})[1].emb, torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="must be >= 0"):
        g.set_negatives([{"emb": neg}], weights=[-1.0])
    with pytest.raises(ValueError, match="for 1 negatives"):
        g.set_negatives([{"emb": neg}], weights=[1.0, 2.0])


def test_config_round_trip(tmp_path):
    g = PerpNegGuidance(guidance_scale=3.0, negative_weight=0.5, guidance_rescale=0.2, start=0.1, stop=0.9)
    g.save_pretrained(tmp_path / "guider")
    back = PerpNegGuidance.from_pretrained(tmp_path / "guider")
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(g.config) and back.negative_weight == 0.5 and back._start == 0.1
    assert g.new(guidance_scale=9.0).guidance_scale == 9.0


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    comps = make_tiny_sdxl_components(tmp_path_factory.mktemp("xl"))
    stock = stable_diffusion_xl.StableDiffusionXLAutoBlocks().init_pipeline()
    stock.update_components(**comps, guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pn = perp_neg_blocks(stable_diffusion_xl.StableDiffusionXLAutoBlocks()).init_pipeline()
    pn.update_components(**comps, guider=PerpNegGuidance(guidance_scale=5.0))
    classic = PerpNegStableDiffusionXLPipeline(**comps)
    classic.set_progress_bar_config(disable=True)
    return stock, pn, classic


def _gen(pipe, prompt="a red cat", seeds=(0,), **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, num_inference_steps=3, generator=gens if len(gens) > 1 else gens[0], height=16,
                width=16, output="latents", **kw)


def test_modular_sdxl_reduces_to_the_stock_guider_and_matches_the_classic_pipeline(xl):
    stock, pn, classic = xl
    ref = _gen(stock)
    assert torch.equal(_gen(pn), ref)  # no negatives: diffusers' CFG exactly
    assert torch.equal(_gen(pn, negative_prompts=["blue dog"], negative_weights=[0.0]), ref)
    torch.testing.assert_close(_gen(pn, negative_prompts=["a red cat"]), ref, rtol=1e-4, atol=1e-4)  # parallel
    out = _gen(pn, negative_prompts=["blue dog", "green"], negative_weights=[1.0, 0.5])
    assert (out - ref).abs().max() > 1e-3
    want = classic(prompt="a red cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="latent",
                   negative_prompts=["blue dog", "green"], negative_weights=[1.0, 0.5]).images
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)  # one UNet call per slot vs one batched call
    assert torch.equal(_gen(pn), ref)  # the negatives of a call do not leak into the next


def test_modular_sdxl_batch_equals_one_by_one(xl):
    _, pn, _ = xl
    both = _gen(pn, prompt=["a red cat", "a blue car"], seeds=(0, 1), negative_prompts=[["dog", "wheel"]],
                negative_weights=[[1.0, 2.0]])
    one = _gen(pn, prompt="a red cat", seeds=(0,), negative_prompts=["dog"], negative_weights=[1.0])
    two = _gen(pn, prompt="a blue car", seeds=(1,), negative_prompts=["wheel"], negative_weights=[2.0])
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=1e-4, atol=1e-4)


def test_modular_errors(xl, tmp_path):
    _, pn, _ = xl
    with pytest.raises(ValueError, match="mean different things"):
        _gen(pn, negative_prompts=["dog"], negative_prompt="ugly")
    plain = perp_neg_blocks(stable_diffusion_xl.StableDiffusionXLAutoBlocks()).init_pipeline()
    plain.update_components(**make_tiny_sdxl_components(tmp_path), guider=ClassifierFreeGuidance(guidance_scale=5.0))
    with pytest.raises(ValueError, match="need the PerpNegGuidance guider"):
        _gen(plain, negative_prompts=["dog"])
    pn.update_components(guider=PerpNegGuidance(guidance_scale=5.0, batch_slots=True))
    with pytest.raises(ValueError, match="SDXL's reads them"):
        _gen(pn, negative_prompts=["dog"])
    pn.update_components(guider=PerpNegGuidance(guidance_scale=5.0))
    with pytest.raises(ValueError, match="not supported"):
        perp_neg_blocks(stable_diffusion_xl.StableDiffusionXLAutoBlocks().sub_blocks["denoise"])


def _flow(pipe, **kw):
    return pipe(prompt="a red cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), height=32,
                width=32, output="latents", **kw)


def test_modular_sd3_reduces_to_the_stock_guider(tmp_path):
    from diffusers.modular_pipelines import stable_diffusion_3

    from diffusion.perpneg.tiny import make_tiny_sd3_components

    comps = make_tiny_sd3_components(tmp_path)
    stock = stable_diffusion_3.StableDiffusion3AutoBlocks().init_pipeline()
    stock.update_components(**comps, guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pn = perp_neg_blocks(stable_diffusion_3.StableDiffusion3AutoBlocks()).init_pipeline()
    pn.update_components(**comps, guider=PerpNegGuidance(guidance_scale=5.0))
    ref = _flow(stock, negative_prompt="")  # stock SD3 runs CFG only with a negative_prompt; Perp-Neg brings ""
    assert torch.equal(_flow(pn), ref)
    assert torch.equal(_flow(pn, negative_prompts=["blue dog"], negative_weights=[0.0]), ref)
    torch.testing.assert_close(_flow(pn, negative_prompts=["a red cat"]), ref, rtol=1e-4, atol=1e-4)
    two = _flow(pn, negative_prompts=["blue dog", "green"], negative_weights=[1.0, 0.5])
    assert (two - ref).abs().max() > 1e-3
    # every slot in one transformer call: the same output as one call per slot, and as the classic pipeline
    pn.update_components(guider=PerpNegGuidance(guidance_scale=5.0, batch_slots=True))
    torch.testing.assert_close(_flow(pn, negative_prompts=["blue dog", "green"], negative_weights=[1.0, 0.5]), two,
                               rtol=1e-4, atol=1e-4)
    from diffusion.perpneg.pipeline_sd3 import PerpNegStableDiffusion3Pipeline

    classic = PerpNegStableDiffusion3Pipeline(**comps)
    classic.set_progress_bar_config(disable=True)
    want = classic(prompt="a red cat", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output_type="latent",
                   negative_prompts=["blue dog", "green"], negative_weights=[1.0, 0.5]).images
    torch.testing.assert_close(two, want, rtol=1e-4, atol=1e-4)


def test_modular_flux_gets_a_guider_and_true_cfg(tmp_path):
    from diffusers import FluxPipeline
    from diffusers.modular_pipelines import flux

    from diffusion.perpneg.tiny import make_tiny_flux_components

    comps = make_tiny_flux_components(tmp_path)  # guidance-distilled (dev-like)
    stock = flux.FluxAutoBlocks().init_pipeline()
    stock.update_components(**comps)
    pn = perp_neg_blocks(flux.FluxAutoBlocks()).init_pipeline()
    pn.update_components(**comps, guider=PerpNegGuidance(guidance_scale=1.0))
    assert torch.equal(_flow(pn), _flow(stock))  # s = 1, no negatives: the distilled model alone, one pass
    pn.update_components(guider=PerpNegGuidance(guidance_scale=4.0))
    classic = FluxPipeline(**comps)
    classic.set_progress_bar_config(disable=True)
    want = classic(prompt="a red cat", num_inference_steps=3, true_cfg_scale=4.0, negative_prompt="", height=32,
                   width=32, generator=torch.Generator().manual_seed(0), output_type="latent").images
    want = classic._unpack_latents(want, 32, 32, classic.vae_scale_factor)
    assert torch.equal(_flow(pn, negative_prompts=["blue"], negative_weights=[0.0]), want)  # diffusers' true CFG
    one = _flow(pn, negative_prompts=["blue"])
    assert (one - want).abs().max() > 1e-3
    pn.update_components(guider=PerpNegGuidance(guidance_scale=4.0, batch_slots=True))
    torch.testing.assert_close(_flow(pn, negative_prompts=["blue"]), one, rtol=1e-4, atol=1e-4)
    from diffusion.perpneg.pipeline_flux import PerpNegFluxPipeline

    ours = PerpNegFluxPipeline(**comps)
    ours.set_progress_bar_config(disable=True)
    classic = ours(prompt="a red cat", num_inference_steps=3, true_cfg_scale=4.0, negative_prompts=["blue"],
                   height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(one, ours._unpack_latents(classic, 32, 32, ours.vae_scale_factor), rtol=1e-4,
                               atol=1e-4)
