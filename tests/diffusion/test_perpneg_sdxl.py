"""Perp-Neg on SDXL: the wrapped UNet call against separate UNet calls and the paper's formula, and the pipeline
against diffusers' plain SDXL output where Perp-Neg must reduce to classifier-free guidance."""

import pytest
import torch

from diffusion.perpneg.guidance import perpendicular_component
from diffusion.perpneg.pipeline_xl import PerpNegStableDiffusionXLPipeline, perp_neg_unet_forward
from diffusion.perpneg.tiny import make_tiny_sdxl_components


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = PerpNegStableDiffusionXLPipeline(**make_tiny_sdxl_components(tmp_path_factory.mktemp("xl")))
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, **kw):
    g = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt="a red cat", num_inference_steps=3, guidance_scale=5.0, output_type="latent", generator=g,
                height=16, width=16, **kw).images


def test_wrapped_unet_equals_separate_calls_and_the_formula(pipe):
    unet, n = pipe.unet, 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=g)
    sample = torch.cat([x, x])
    ehs = torch.randn(2 * n, 77, 32, generator=g)
    added = {"text_embeds": torch.randn(2 * n, 16, generator=g), "time_ids": torch.tensor([[16., 16, 0, 0, 16, 16]] * 2 * n)}
    negs = [torch.randn(n, 77, 32, generator=g) for _ in range(2)]
    pooled = [torch.randn(n, 16, generator=g) for _ in range(2)]
    w = torch.tensor([[-1.0, -0.5], [-2.0, -2.0]])  # two negatives, per-sample weights
    t = torch.tensor(500)
    with torch.no_grad():
        out = perp_neg_unet_forward(unet.forward, n, negs, pooled, w)(sample, t, ehs, added_cond_kwargs=added,
                                                                        return_dict=False)[0]
        sep = unet(sample, t, ehs, added_cond_kwargs=added).sample
        eps_u, eps_p = sep[:n], sep[n:]
        eps_neg = [unet(x, t, e, added_cond_kwargs={"text_embeds": pe, "time_ids": added["time_ids"][n:]}).sample
                   for e, pe in zip(negs, pooled, strict=True)]
    e_p = eps_p - eps_u
    expected = eps_p.clone()
    for k in range(2):  # eps_pos' = eps_pos + sum_k w_k perp(eps_k - eps_u, e_pos)
        expected += w[k].view(-1, 1, 1, 1) * perpendicular_component(eps_neg[k] - eps_u, e_p)
    torch.testing.assert_close(out[:n], eps_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[n:], expected, atol=1e-5, rtol=1e-4)
    # chunked UNet calls give the same result
    with torch.no_grad():
        chunked = perp_neg_unet_forward(unet.forward, n, negs, pooled, w, unet_batch_size=3)(
            sample, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
    torch.testing.assert_close(chunked, out, atol=1e-5, rtol=1e-4)


def test_pipeline_reduces_to_cfg_and_restores_the_unet(pipe):
    from diffusers import StableDiffusionXLPipeline

    plain = _run(pipe)
    assert torch.equal(plain, StableDiffusionXLPipeline.__call__(
        pipe, prompt="a red cat", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(0), height=16, width=16).images)
    # a negative parallel to the prompt (the prompt itself) or with weight 0 has no perpendicular part
    torch.testing.assert_close(_run(pipe, negative_prompts=["a red cat"]), plain, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(_run(pipe, negative_prompts=["a blue dog"], negative_weights=[0.0]), plain,
                               atol=1e-4, rtol=1e-3)
    moved = _run(pipe, negative_prompts=["a blue dog"], negative_weights=[3.0])
    assert not torch.allclose(moved, plain, atol=1e-3)
    assert "forward" not in pipe.unet.__dict__  # the UNet is itself again
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(prompt="a red cat", negative_prompts=["x"], guidance_scale=1.0, num_inference_steps=1,
             output_type="latent")
    with pytest.raises(ValueError, match=">= 0"):
        _run(pipe, negative_prompts=["x"], negative_weights=[-1.0])
    assert "forward" not in pipe.unet.__dict__


def test_cli_image_on_sdxl_and_clear_error_for_views(pipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from diffusion.perpneg.cli import generate_app

    pipe.save_pretrained(str(tmp_path / "sdxl"))
    run = CliRunner()
    res = run.invoke(generate_app, ["image", "--model", str(tmp_path / "sdxl"), "--prompt", "a cat", "--negative",
                                    "a dog", "--negative-weight", "1.5", "--steps", "2", "--height", "16", "--width",
                                    "16", "--guidance", "5", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["negative"] == ["a dog"]
    assert (tmp_path / "out" / "image_000.png").is_file()
    res = run.invoke(generate_app, ["views", "--model", str(tmp_path / "sdxl"), "--prompt", "a cat", "--out",
                                    str(tmp_path / "v")])
    assert res.exit_code == 2 and "SDXL" in res.output


def test_batch_of_prompts_with_images_per_prompt(pipe):
    kw = dict(prompt=["a red cat", "a green tree"], num_images_per_prompt=2, num_inference_steps=2, guidance_scale=4.0,
              output_type="latent", height=16, width=16)
    plain = pipe(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    # per-prompt negatives (a list of one per prompt), weights [K, B]: zero weight for the first prompt only
    out = pipe(generator=torch.Generator("cpu").manual_seed(0), negative_prompts=[["a dog", "a car"]],
               negative_weights=[[0.0, 2.0]], **kw).images
    assert out.shape == plain.shape == (4, 4, 8, 8)
    torch.testing.assert_close(out[:2], plain[:2], atol=1e-4, rtol=1e-3)  # images of prompt 1: plain CFG
    assert not torch.allclose(out[2:], plain[2:], atol=1e-3)
