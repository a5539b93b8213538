"""Neon on the 2D toy (Alemohammad et al. 2025, Sec. "toy"): distance to the true distribution vs w; one JSON line.

    python benchmarks/neon_toy2d.py                       # defaults: 5 seeds, 256 training points, ~6 min on 2 contended CPU cores
    python benchmarks/neon_toy2d.py --seeds 2 --base-steps 300 --self-steps 50    # smoke size

Per seed: a small MLP denoiser (diffusers DDPMScheduler, epsilon prediction) is trained on a limited sample of an
8-mode Gaussian mixture (the base model); N samples are drawn from it with its sampler (default DDIM, 20 steps); a copy is
fine-tuned on those samples (self-training); then for each w the Neon merge
theta_neon = (1 + w) * theta_base - w * theta_selftrained is sampled and scored against fresh samples of the true
mixture with the sliced Wasserstein-2 distance and an RBF-kernel MMD^2. Figures are mean and standard error over
seeds; w = 0 is the base model. ``floor`` is the distance between two independent true samples of the same size.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.neon import neon_merge  # noqa: E402


def mixture(n: int, g: torch.Generator, modes: int = 8, radius: float = 2.0, std: float = 0.15) -> torch.Tensor:
    """n points of ``modes`` equal-weight Gaussians on a circle."""
    k = torch.randint(0, modes, (n,), generator=g)
    ang = 2 * math.pi * k.float() / modes
    centers = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], dim=1)
    return centers + std * torch.randn(n, 2, generator=g)


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t): MLP on [x_t, sinusoidal(t)]."""

    def __init__(self, hidden: int = 128, temb: int = 32, num_t: int = 100):
        super().__init__()
        self.temb, self.num_t = temb, num_t
        self.net = nn.Sequential(
            nn.Linear(2 + temb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.temb // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t.float()[:, None] * freqs[None] * (1000.0 / self.num_t)
        return self.net(torch.cat([x, torch.sin(a), torch.cos(a)], dim=1))


def train(model: nn.Module, data: torch.Tensor, sched, steps: int, lr: float, batch: int, seed: int) -> None:
    """Standard DDPM epsilon-prediction training (Adam, cosine-decayed lr)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    num_t = sched.config.num_train_timesteps
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (min(batch, len(data)),), generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, num_t, (len(x0),), generator=g)
        loss = nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()


@torch.no_grad()
def sample(model: nn.Module, sched, n: int, steps: int, seed: int) -> torch.Tensor:
    """``steps``-step sampling with ``sched`` (DDPM: ancestral; DDIM: deterministic, eta = 0)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    sched.set_timesteps(steps)
    x = torch.randn(n, 2, generator=g)
    for t in sched.timesteps:
        eps = model(x, t.expand(n))
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between equal-size point sets."""
    g = torch.Generator().manual_seed(seed)
    th = torch.randn(2, n_proj, generator=g)
    th = th / th.norm(dim=0, keepdim=True)
    pa, _ = (a @ th).sort(dim=0)
    pb, _ = (b @ th).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels."""
    def k(x, y):
        d = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d / (2 * s * s)) for s in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
                 - 2 * kab.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=256, help="limited training set of the base model")
    ap.add_argument("--base-steps", type=int, default=3000)
    ap.add_argument("--n-self", type=int, default=2048, help="self-generated samples for self-training")
    ap.add_argument("--self-steps", type=int, default=500)
    ap.add_argument("--self-lr", type=float, default=2e-4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-t", type=int, default=100, help="training timesteps")
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                    help="ddim: deterministic ODE-like sampler (eta=0); ddpm: ancestral")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--w", default="0,0.25,0.5,0.75,1,1.5,2,3")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, DDPMScheduler

    ws = [float(x) for x in args.w.split(",")]
    t_start = time.time()
    sw = np.zeros((args.seeds, len(ws)))
    mm = np.zeros((args.seeds, len(ws)))
    floor_sw, floor_mmd, self_sw = [], [], []
    for s in range(args.seeds):
        g = torch.Generator().manual_seed(1000 + s)
        data = mixture(args.n_train, g)
        truth = mixture(args.n_eval, g)
        truth2 = mixture(args.n_eval, g)
        floor_sw.append(sliced_w2(truth, truth2, seed=s))
        floor_mmd.append(mmd2(truth, truth2))
        sched = DDPMScheduler(num_train_timesteps=args.num_t, beta_schedule="squaredcos_cap_v2", clip_sample=False)
        if args.sampler == "ddim":
            sched = DDIMScheduler.from_config(sched.config)  # same noise schedule, used for training and sampling
        torch.manual_seed(s)
        base = MLPDenoiser(num_t=args.num_t)
        train(base, data, sched, args.base_steps, args.lr, args.batch, seed=s)
        synth = sample(base, sched, args.n_self, args.sample_steps, seed=10_000 + s)
        selft = copy.deepcopy(base)
        train(selft, synth, sched, args.self_steps, args.self_lr, args.batch, seed=20_000 + s)
        self_sw.append(sliced_w2(sample(selft, sched, args.n_eval, args.sample_steps, seed=30_000 + s), truth, seed=s))
        theta_b, theta_s = base.state_dict(), selft.state_dict()
        model = MLPDenoiser(num_t=args.num_t)
        for j, w in enumerate(ws):
            model.load_state_dict(neon_merge(theta_b, theta_s, w))
            x = sample(model, sched, args.n_eval, args.sample_steps, seed=30_000 + s)  # same noise for every w
            sw[s, j] = sliced_w2(x, truth, seed=s)
            mm[s, j] = mmd2(x, truth)
        print(f"seed {s}: SW2 " + " ".join(f"w={w:g}:{v:.4f}" for w, v in zip(ws, sw[s], strict=True)),
              file=sys.stderr, flush=True)

    def stats(a):
        return a.mean(0), a.std(0, ddof=1) / math.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])

    sw_m, sw_e = stats(sw)
    mm_m, mm_e = stats(mm)
    best = int(np.argmin(sw_m))
    wins = (sw[:, best] < sw[:, 0]).sum() if ws[0] == 0 else None
    out = {
        "benchmark": "neon_toy2d",
        "device": "cpu",
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)",
        "config": {k: v for k, v in vars(args).items() if k != "w"},
        "w": ws,
        "sliced_w2_mean": [round(v, 5) for v in sw_m],
        "sliced_w2_sem": [round(v, 5) for v in sw_e],
        "mmd2_mean": [round(v, 6) for v in mm_m],
        "mmd2_sem": [round(v, 6) for v in mm_e],
        "selftrained_sliced_w2_mean": round(float(np.mean(self_sw)), 5),
        "floor_sliced_w2": round(float(np.mean(floor_sw)), 5),
        "floor_mmd2": round(float(np.mean(floor_mmd)), 6),
        "best_w_by_sliced_w2": ws[best],
        "base_sliced_w2": round(float(sw_m[ws.index(0.0)]), 5) if 0.0 in ws else None,
        "best_sliced_w2": round(float(sw_m[best]), 5),
        "seeds_where_best_w_beats_base": None if wins is None else f"{int(wins)}/{args.seeds}",
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
