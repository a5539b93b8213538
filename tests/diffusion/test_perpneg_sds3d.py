"""PerpNegSDS (one batched UNet call, t range, weighting) and a few text-to-3D iterations with exports."""

import pytest
import torch

from diffusion.perpneg.grid3d import (
    DensityColorGrid,
    TextTo3DConfig,
    camera_rays,
    load_checkpoint,
    train_text_to_3d,
)
from diffusion.perpneg.sds import PerpNegSDS
from diffusion.perpneg.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def sds(tmp_path_factory):
    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tiny3d"))
    return PerpNegSDS.from_pipeline(pipe, "a corgi")


def test_sds_one_batched_call_and_gradient(sds):
    sizes = []
    h = sds.unet.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    rgb = torch.rand(3, 3, 16, 16, requires_grad=True)
    loss = sds(rgb, torch.tensor([0.0, 10.0, 70.0]), torch.tensor([0.0, 120.0, -60.0]))
    h.remove()
    assert sizes == [3 * 4]  # [uncond, pos, neg_1, neg_2] x B in one call
    loss.backward()
    assert torch.isfinite(loss) and rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert sds.guidance_scale == 100.0 and (sds.min_t, sds.max_t) == (20, 980)
    t = sds.last["t"]
    assert ((t >= 20) & (t <= 980)).all()


def test_sds_weight_is_one_minus_alpha_bar(sds, monkeypatch):
    # with eps_hat forced to 2 * noise, grad = (1 - alpha_bar_t) * noise: check its norm against the formula
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 16, 16)
    t = torch.tensor([100, 900])
    noises = []
    orig = torch.randn_like

    def rec(x, *a, **k):
        n = orig(x, *a, **k)
        noises.append(n)
        return n

    monkeypatch.setattr(torch, "randn_like", rec)
    monkeypatch.setattr("diffusion.perpneg.sds.perp_neg_guidance", lambda u, p, n, w, s: 2 * noises[-1])
    sds(rgb, torch.zeros(2), torch.zeros(2), t=t)
    w = 1 - sds.alphas_cumprod[t]
    expect = w * noises[-1].flatten(1).norm(dim=1)
    assert torch.allclose(sds.last["grad_norm"], expect, rtol=1e-4)


def test_to_epsilon_inverts_each_parameterisation():
    from diffusion.perpneg.sds import to_epsilon

    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a = torch.tensor([0.9, 0.5, 0.05]).view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(to_epsilon(eps, z_t, a, "epsilon"), eps)
    assert torch.allclose(to_epsilon(v, z_t, a, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_epsilon(z0, z_t, a, "sample"), eps, atol=1e-5)
    with pytest.raises(ValueError, match="'flow' is not one of epsilon, v_prediction, sample"):
        to_epsilon(eps, z_t, a, "flow")


def test_sds_converts_a_v_prediction_unet_to_epsilon(tmp_path, monkeypatch):
    """A tiny UNet whose scheduler says v_prediction: the guidance gets eps = sqrt(a) v + sqrt(1 - a) z_t of each
    of its outputs (not the raw v), and the gradient differs from the epsilon reading of the same outputs."""
    from diffusers import DDIMScheduler

    pipe = make_tiny_pipeline(tmp_path)
    sched_v = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    sds_v = PerpNegSDS(pipe.unet, pipe.vae, sched_v, PerpNegSDS.from_pipeline(pipe, "a corgi").view_embeds)
    sds_e = PerpNegSDS(pipe.unet, pipe.vae, pipe.scheduler, sds_v.view_embeds)
    assert (sds_v.prediction_type, sds_e.prediction_type) == ("v_prediction", "epsilon")
    raw, seen = {}, {}

    def hook(m, args, kwargs, out):
        raw["z"], raw["out"] = args[0].float(), out.sample.float()

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    import diffusion.perpneg.sds as sds_mod

    real = sds_mod.perp_neg_guidance

    def spy(u, p, n, w, s):
        seen["u"], seen["p"] = u.clone(), p.clone()
        return real(u, p, n, w, s)

    monkeypatch.setattr(sds_mod, "perp_neg_guidance", spy)
    rgb, t = torch.rand(2, 3, 16, 16), torch.tensor([200, 700])
    try:
        torch.manual_seed(1)
        sds_v(rgb, torch.zeros(2), torch.zeros(2), t=t)
        g_v = sds_v.last["grad_norm"]
        a = sds_v.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = raw["z"][:2]
        want_u = a.sqrt() * raw["out"][:2] + (1 - a).sqrt() * z_t  # eps from v, by hand
        want_p = a.sqrt() * raw["out"][2:4] + (1 - a).sqrt() * z_t
        assert torch.allclose(seen["u"], want_u, atol=1e-5) and torch.allclose(seen["p"], want_p, atol=1e-5)
        torch.manual_seed(1)
        sds_e(rgb, torch.zeros(2), torch.zeros(2), t=t)
        assert torch.allclose(seen["u"], raw["out"][:2])  # epsilon: the raw output
        assert not torch.allclose(sds_e.last["grad_norm"], g_v, rtol=1e-3)
    finally:
        h.remove()
    with pytest.raises(ValueError, match="prediction_type 'x'"):
        PerpNegSDS(pipe.unet, pipe.vae, pipe.scheduler, sds_v.view_embeds, prediction_type="x")


def test_render_shapes_and_range():
    grid = DensityColorGrid(resolution=8)
    o, d = camera_rays(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.5, 2.5]), 6)
    out = grid.render(o, d, n_samples=8)
    assert out["rgb"].shape == (2, 3, 6, 6) and out["opacity"].shape == (2, 1, 6, 6)
    assert out["rgb"].min() >= 0 and out["rgb"].max() <= 1
    assert out["opacity"][:, :, 3, 3].min() > 0.5  # the centred blob is visible


def test_text_to_3d_loop_changes_grid_and_exports(sds, tmp_path):
    grid = DensityColorGrid(resolution=10)
    before = {k: v.clone() for k, v in grid.state_dict().items()}
    res = train_text_to_3d(sds, grid, TextTo3DConfig(iters=3, render_resolution=16, n_samples=8), out_dir=tmp_path,
                           preview_every=2, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in grid.state_dict().items())
    for key in ("gif", "mesh_obj", "mesh_ply", "checkpoint"):
        assert res[key].is_file() and res[key].stat().st_size > 0
    assert (tmp_path / "previews" / "iter_000002.png").is_file() and (tmp_path / "log.csv").is_file()
    assert "\nf " in res["mesh_obj"].read_text()
    loaded = load_checkpoint(res["checkpoint"])
    assert torch.equal(loaded.density, grid.density.detach())


def test_exports_are_atomic_and_follow_the_umask(tmp_path):
    import os

    from diffusion.perpneg.grid3d import export_mesh, save_checkpoint, save_turntable
    from vision.engine.logs import CSVLog

    grid = DensityColorGrid(resolution=6)
    old = os.umask(0o027)
    try:
        paths = [save_checkpoint(grid, tmp_path / "g.safetensors", {"iters": 1}), tmp_path / "g.json",
                 export_mesh(grid, tmp_path / "m.obj"), export_mesh(grid, tmp_path / "m.ply"),
                 save_turntable([torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()] * 2, tmp_path / "t.gif"),
                 tmp_path / "log.csv"]
        CSVLog(tmp_path / "log.csv").write({"iter": 0, "loss_sds": 1.5, "opacity": 0.25})  # as train_text_to_3d
    finally:
        os.umask(old)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o640, p.name
    assert (tmp_path / "log.csv").read_text().splitlines() == ["iter,loss_sds,opacity", "0,1.5,0.25"]
    assert load_checkpoint(tmp_path / "g.safetensors").resolution == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    damaged = tmp_path / "g.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(ValueError, match="g.safetensors: damaged checkpoint file"):
        load_checkpoint(damaged)


def test_damaged_grid_config_names_the_file(tmp_path):
    from diffusion.perpneg.grid3d import save_checkpoint

    save_checkpoint(DensityColorGrid(resolution=6), tmp_path / "g.safetensors", {"iters": 1})
    cfg = tmp_path / "g.json"
    cfg.write_text(cfg.read_text()[:15])
    with pytest.raises(ValueError, match=r"g\.json: cannot read the run's spec file"):
        load_checkpoint(tmp_path / "g.safetensors")
    cfg.write_text('{"resolution": 6}')
    with pytest.raises(ValueError, match=r"g\.json: lacks bound"):
        load_checkpoint(tmp_path / "g.safetensors")
