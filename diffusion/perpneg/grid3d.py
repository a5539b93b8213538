"""A compact differentiable 3D representation (density + albedo voxel grid, volume rendering with Lambertian
shading and a learned background) and a small text-to-3D loop trained by PerpNegSDS. Plain torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.io import atomic_writer, write_bytes_atomic, write_text_atomic


class DensityColorGrid(nn.Module):
    """Voxel grid on [-bound, bound]^3: density (softplus of raw + a centred blob, as in DreamFusion) and albedo."""

    def __init__(self, resolution: int = 32, bound: float = 1.0, blob_density: float = 5.0, blob_radius: float = 0.5):
        super().__init__()
        r = resolution
        self.resolution, self.bound = r, bound
        self.blob_density, self.blob_radius = blob_density, blob_radius
        self.density = nn.Parameter(torch.zeros(1, 1, r, r, r))
        self.albedo = nn.Parameter(torch.zeros(1, 3, r, r, r))
        self.background = nn.Parameter(torch.zeros(3))

    def config(self) -> dict:
        return {"resolution": self.resolution, "bound": self.bound, "blob_density": self.blob_density,
                "blob_radius": self.blob_radius}

    def _sample(self, vol: Tensor, pts: Tensor) -> Tensor:
        """Trilinear lookup of vol [1, C, D, H, W] at pts [N, 3] (x, y, z) -> [N, C]."""
        g = (pts / self.bound).view(1, -1, 1, 1, 3)  # grid_sample's last dim is (x->W, y->H, z->D)
        return F.grid_sample(vol, g, align_corners=True, padding_mode="border").view(vol.shape[1], -1).t()

    def query(self, pts: Tensor, with_normals: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """sigma [N], albedo [N, 3] in [0, 1], normals [N, 3] (from -grad sigma) at points [N, 3]."""
        inside = (pts.abs() <= self.bound).all(dim=-1).float()
        blob = self.blob_density * torch.exp(-(pts**2).sum(-1) / (2 * self.blob_radius**2))
        sigma = F.softplus(self._sample(self.density, pts)[:, 0] + blob) * inside
        albedo = torch.sigmoid(self._sample(self.albedo, pts))
        normals = None
        if with_normals:
            vol = self.density[0, 0]
            gz, gy, gx = torch.gradient(vol, spacing=2 * self.bound / (self.resolution - 1))
            grad = self._sample(torch.stack([gx, gy, gz])[None], pts)
            grad = grad - pts * self.blob_density / self.blob_radius**2 * torch.exp(
                -(pts**2).sum(-1, keepdim=True) / (2 * self.blob_radius**2)
            )  # + grad of the blob term
            normals = F.normalize(-grad, dim=-1, eps=1e-6)
        return sigma, albedo, normals

    def render(
        self, rays_o: Tensor, rays_d: Tensor, n_samples: int = 32, shading: str = "lambertian",
        light_dir: Tensor | None = None, ambient: float = 0.3, perturb: bool = False, bg: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Volume-render rays [B, H, W, 3] -> rgb [B, 3, H, W] in [0, 1], opacity and depth [B, 1, H, W]."""
        b, h, w, _ = rays_o.shape
        o, d = rays_o.reshape(-1, 3), F.normalize(rays_d.reshape(-1, 3), dim=-1)
        dist = o.norm(dim=-1, keepdim=True)
        half = self.bound * math.sqrt(3)
        near, far = (dist - half).clamp_min(0.05), dist + half
        u = torch.linspace(0, 1, n_samples, device=o.device)[None].expand(o.shape[0], n_samples)
        if perturb:
            u = u + (torch.rand_like(u) - 0.5) / n_samples
        ts = near + (far - near) * u  # [R, S]
        pts = o[:, None] + d[:, None] * ts[..., None]
        need_n = shading != "albedo"
        sigma, albedo, normals = self.query(pts.reshape(-1, 3), with_normals=need_n)
        sigma, albedo = sigma.view(-1, n_samples), albedo.view(-1, n_samples, 3)
        deltas = torch.cat([ts[:, 1:] - ts[:, :-1], torch.full_like(ts[:, :1], 1e-3)], dim=-1)
        alpha = 1 - torch.exp(-sigma * deltas)  # alpha_i = 1 - exp(-sigma_i delta_i)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)[:, :-1]
        weights = alpha * trans  # w_i = T_i alpha_i
        if need_n:
            if light_dir is None:
                light_dir = F.normalize(o.mean(0), dim=0)  # light from the camera side
            lam = (normals.view(-1, n_samples, 3) @ light_dir.to(o)).clamp_min(0)[..., None]
            shade = ambient + (1 - ambient) * lam  # Lambertian: a + (1 - a) max(0, n.l)
            color = shade.expand(-1, -1, 3) if shading == "textureless" else albedo * shade
        else:
            color = albedo
        opacity = weights.sum(-1, keepdim=True)
        bg = torch.sigmoid(self.background) if bg is None else bg
        rgb = (weights[..., None] * color).sum(1) + (1 - opacity) * bg  # composite over the background
        depth = (weights * ts).sum(-1, keepdim=True)
        to_img = lambda x: x.view(b, h, w, -1).permute(0, 3, 1, 2)  # noqa: E731
        return {"rgb": to_img(rgb), "opacity": to_img(opacity), "depth": to_img(depth)}

    @torch.no_grad()
    def density_volume(self, resolution: int | None = None) -> Tensor:
        """sigma on a regular grid [R, R, R] indexed (x, y, z)."""
        r = resolution or self.resolution
        lin = torch.linspace(-self.bound, self.bound, r, device=self.density.device)
        pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).view(-1, 3)
        return self.query(pts, with_normals=False)[0].view(r, r, r)


def camera_rays(
    elevation_deg: Tensor, azimuth_deg: Tensor, radius: Tensor, resolution: int, fov_deg: float = 40.0
) -> tuple[Tensor, Tensor]:
    """Rays [B, H, W, 3] of cameras looking at the origin; azimuth 0 = front (+x), z up."""
    el, az = torch.deg2rad(elevation_deg.float()), torch.deg2rad(azimuth_deg.float())
    pos = radius.float()[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    fwd = F.normalize(-pos, dim=-1)
    up0 = torch.tensor([0.0, 0.0, 1.0]).expand_as(fwd)
    right = F.normalize(torch.cross(fwd, up0, dim=-1), dim=-1, eps=1e-6)
    up = torch.cross(right, fwd, dim=-1)
    s = math.tan(math.radians(fov_deg) / 2)
    lin = (torch.arange(resolution) + 0.5) / resolution * 2 - 1
    v, u = torch.meshgrid(-lin, lin, indexing="ij")  # image rows go down
    d = fwd[:, None, None] + s * (u[None, ..., None] * right[:, None, None] + v[None, ..., None] * up[:, None, None])
    return pos[:, None, None].expand_as(d).contiguous(), F.normalize(d, dim=-1)


def sample_cameras(
    batch: int, elevation_range=(-10.0, 45.0), radius_range=(2.5, 3.0), generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random cameras around the object: elevation, azimuth in [-180, 180), radius."""
    r = torch.rand(batch, 3, generator=generator)
    el = elevation_range[0] + r[:, 0] * (elevation_range[1] - elevation_range[0])
    az = r[:, 1] * 360 - 180
    rad = radius_range[0] + r[:, 2] * (radius_range[1] - radius_range[0])
    return el, az, rad


@torch.no_grad()
def export_mesh(grid: DensityColorGrid, path: Path, resolution: int | None = None, level: float | None = None) -> Path:
    """Marching cubes on the density -> .obj or .ply with vertex colours (albedo)."""
    from skimage.measure import marching_cubes

    vol = grid.density_volume(resolution).cpu().numpy()
    if level is None or not (vol.min() < level < vol.max()):
        level = float(vol.min() + 0.5 * (vol.max() - vol.min())) if level is None or vol.max() > vol.min() else 0.0
    if vol.max() <= vol.min():
        vol = vol.copy()
        vol[vol.shape[0] // 2, vol.shape[1] // 2, vol.shape[2] // 2] = 1.0
        level = 0.5
    verts, faces, _, _ = marching_cubes(vol, level=level)
    r = vol.shape[0]
    verts = verts / (r - 1) * 2 * grid.bound - grid.bound
    _, albedo, _ = grid.query(torch.from_numpy(verts).float().to(grid.density.device), with_normals=False)
    cols = albedo.cpu().numpy()
    path = Path(path)
    with atomic_writer(path, "w") as f:
        if path.suffix == ".ply":
            f.write(f"ply\nformat ascii 1.0\nelement vertex {len(verts)}\nproperty float x\nproperty float y\n"
                    "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
                    f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
            for v, c in zip(verts, (cols * 255).astype(np.uint8), strict=True):
                f.write(f"{v[0]:.5f} {v[1]:.5f} {v[2]:.5f} {c[0]} {c[1]} {c[2]}\n")
            for fc in faces:
                f.write(f"3 {fc[0]} {fc[1]} {fc[2]}\n")
        else:
            for v, c in zip(verts, cols, strict=True):
                f.write(f"v {v[0]:.5f} {v[1]:.5f} {v[2]:.5f} {c[0]:.4f} {c[1]:.4f} {c[2]:.4f}\n")
            for fc in faces + 1:
                f.write(f"f {fc[0]} {fc[1]} {fc[2]}\n")
    return path


@torch.no_grad()
def render_turntable(grid: DensityColorGrid, n_frames: int = 24, resolution: int = 64, elevation: float = 15.0,
                     radius: float = 2.8, n_samples: int = 48) -> list[np.ndarray]:
    """Frames (uint8 HxWx3) of a full turn around the object."""
    frames = []
    for az in torch.linspace(-180, 180, n_frames + 1)[:-1]:
        o, d = camera_rays(torch.tensor([elevation]), az[None], torch.tensor([radius]), resolution)
        rgb = grid.render(o.to(grid.density.device), d.to(grid.density.device), n_samples=n_samples)["rgb"][0]
        frames.append((rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))
    return frames


def save_turntable(frames: list[np.ndarray], path: Path, fps: int = 12) -> Path:
    """Write frames as a GIF (or MP4 when the path ends in .mp4 and imageio-ffmpeg is installed), atomically."""
    path = Path(path)
    if path.suffix == ".gif":
        import imageio.v2 as imageio

        data = imageio.mimwrite("<bytes>", frames, format="GIF", duration=1 / fps, loop=0)
    else:
        import importlib.util

        import imageio.v3 as iio

        if importlib.util.find_spec("imageio_ffmpeg") is None:
            raise ImportError(f"writing '{path.name}' needs `pip install imageio-ffmpeg` (or use a .gif path)")
        data = iio.imwrite("<bytes>", np.stack(frames), extension=path.suffix, fps=fps)
    write_bytes_atomic(path, data)
    return path


def save_checkpoint(grid: DensityColorGrid, path: Path, extra: dict | None = None) -> Path:
    """safetensors weights + a JSON config next to them (atomic writes)."""
    from safetensors.torch import save

    path = Path(path)
    write_bytes_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in grid.state_dict().items()}))
    cfg = {**grid.config(), **(extra or {})}
    write_text_atomic(path.with_suffix(".json"), json.dumps(cfg, indent=2))
    return path


def load_checkpoint(path: Path) -> DensityColorGrid:
    """Inverse of save_checkpoint (the engine's loader: a damaged file gives one error naming it)."""
    from vision.engine import load_model_weights
    from vision.engine.run import read_spec

    path = Path(path)
    cfg = read_spec(path.with_suffix(".json"))  # ValueError naming a damaged file
    keys = ("resolution", "bound", "blob_density", "blob_radius")
    if any(k not in cfg for k in keys):
        raise ValueError(f"{path.with_suffix('.json')}: lacks {', '.join(k for k in keys if k not in cfg)}")
    grid = DensityColorGrid(**{k: cfg[k] for k in keys})
    load_model_weights(grid, path)
    return grid


@dataclass
class TextTo3DConfig:
    """Optimisation settings of :func:`train_text_to_3d`.

    Attributes:
        iters: Adam steps on the grid.
        batch_size: random cameras per step.
        render_resolution: rendered image side in pixels.
        n_samples: samples per ray.
        lr: Adam learning rate.
        seed: seeds the torch RNG and the camera / shading draws.
        lambda_opacity: weight of the opacity sparsity prior.
        textureless_prob: share of steps rendered with textureless shading.
    """

    iters: int = 1000
    batch_size: int = 1
    render_resolution: int = 64
    n_samples: int = 32
    lr: float = 1e-2
    seed: int = 0
    lambda_opacity: float = 1e-3
    textureless_prob: float = 0.2


def train_text_to_3d(sds, grid: DensityColorGrid, config: TextTo3DConfig | None = None, out_dir: Path | None = None,
                     preview_every: int = 0, progress: bool = True) -> dict:
    """Optimise ``grid`` with ``sds`` (PerpNegSDS) from random cameras; write previews, log, GIF, mesh, checkpoint.

    ``config``: the optimisation settings (None: :class:`TextTo3DConfig`'s defaults); ``out_dir`` None writes
    nothing; ``preview_every`` (> 0, with ``out_dir``): a 4-view preview every that many steps."""
    from tqdm.auto import tqdm

    cfg = config if config is not None else TextTo3DConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = grid.density.device
    opt = torch.optim.Adam(grid.parameters(), lr=cfg.lr)
    out = Path(out_dir) if out_dir else None
    log = []
    csv_log = None
    if out:  # the engine's CSV log, streamed (one row per iteration); a new run starts it afresh
        from vision.engine.logs import CSVLog

        out.mkdir(parents=True, exist_ok=True)
        (out / "log.csv").unlink(missing_ok=True)
        csv_log = CSVLog(out / "log.csv")
    for it in tqdm(range(cfg.iters), disable=not progress, desc="text-to-3D"):
        el, az, rad = sample_cameras(cfg.batch_size, generator=gen)
        o, d = camera_rays(el, az, rad, cfg.render_resolution)
        shading = "textureless" if torch.rand(1, generator=gen).item() < cfg.textureless_prob else "lambertian"
        r = grid.render(o.to(device), d.to(device), n_samples=cfg.n_samples, shading=shading, perturb=True)
        loss_sds = sds(r["rgb"], el.to(device), az.to(device))
        loss = loss_sds + cfg.lambda_opacity * r["opacity"].mean()  # small sparsity prior on opacity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"iter": it, "loss_sds": float(loss_sds.detach()), "opacity": float(r["opacity"].detach().mean())}
        log.append(row)
        if csv_log is not None:
            csv_log.write(row)
        if out and preview_every and (it + 1) % preview_every == 0:
            from vision.viz import save_image

            frames = render_turntable(grid, n_frames=4, resolution=cfg.render_resolution, n_samples=cfg.n_samples)
            save_image(np.concatenate(frames, axis=1), out / "previews" / f"iter_{it + 1:06d}.png")
    result: dict = {"log": log}
    if out:
        frames = render_turntable(grid, resolution=cfg.render_resolution, n_samples=cfg.n_samples)
        result["gif"] = save_turntable(frames, out / "turntable.gif")
        result["mesh_obj"] = export_mesh(grid, out / "mesh.obj")
        result["mesh_ply"] = export_mesh(grid, out / "mesh.ply")
        result["checkpoint"] = save_checkpoint(grid, out / "grid.safetensors", {"iters": cfg.iters, "seed": cfg.seed})
    return result
