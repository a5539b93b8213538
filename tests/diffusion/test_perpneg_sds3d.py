"""PerpNegSDS (one batched UNet call, t range, weighting) and a few text-to-3D iterations with exports."""

import pytest
import torch

from diffusion.perpneg.grid3d import DensityColorGrid, camera_rays, load_checkpoint, train_text_to_3d
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
    res = train_text_to_3d(sds, grid, iters=3, render_resolution=16, n_samples=8, out_dir=tmp_path,
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
