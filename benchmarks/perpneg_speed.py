"""Perp-Neg per-step cost: one batched UNet call over [uncond, pos, neg_1..K] vs the official sequential
per-prompt calls, and vs plain CFG, same UNet and inputs in one run. Prints ONE JSON line.

    python benchmarks/perpneg_speed.py [--ks 1,2,4] [--batch 1] [--size 16] [--repeats 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from diffusion.perpneg import perp_neg_guidance


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds per call (after two warm-up calls; the median resists a contended CPU)."""
    fn(), fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=16, help="latent size of the tiny UNet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="a real SD pipeline folder (GPU) instead of the tiny UNet")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.model:
        from diffusion.perpneg.cli import load_pipeline

        unet = load_pipeline(a.model).unet
    else:
        from diffusion.perpneg.tiny import make_tiny_components

        unet = make_tiny_components(tempfile.mkdtemp(), sample_size=a.size)["unet"]
    dev, dtype = unet.device, unet.dtype
    c, s, d = unet.config.in_channels, a.size if not a.model else unet.config.sample_size, unet.config.cross_attention_dim
    b = a.batch
    x = torch.randn(b, c, s, s, device=dev, dtype=dtype)
    t = torch.tensor(500, device=dev)
    max_k = max(int(k) for k in a.ks.split(","))
    emb = torch.randn(2 + max_k, b, 77, d, device=dev, dtype=dtype)
    unet_f = torch.no_grad()(lambda xx, ee: unet(xx, t, encoder_hidden_states=ee).sample)

    def cfg():
        e = unet_f(torch.cat([x] * 2), emb[:2].flatten(0, 1)).view(2, b, c, s, s)
        return e[0] + 7.5 * (e[1] - e[0])

    t_cfg, _ = _time(cfg, a.repeats)
    res = {"benchmark": "perpneg_speed", "device": str(dev), "batch": b, "latent": s, "repeats": a.repeats,
           "cfg_step_s": round(t_cfg, 5), "k": {}}
    for k in (int(k) for k in a.ks.split(",")):
        w = torch.ones(k)

        def batched(k=k, w=w):
            e = unet_f(torch.cat([x] * (2 + k)), emb[: 2 + k].flatten(0, 1)).view(2 + k, b, c, s, s)
            return perp_neg_guidance(e[0], e[1], e[2:], w, 7.5)

        def sequential(k=k, w=w):
            es = [unet_f(x, emb[i]) for i in range(2 + k)]  # the official scheme: one call per prompt
            return perp_neg_guidance(es[0], es[1], torch.stack(es[2:]), w, 7.5)

        t_b, out_b = _time(batched, a.repeats)
        mem_b = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        t_s, out_s = _time(sequential, a.repeats)
        mem_s = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        res["k"][str(k)] = {
            "batched_step_s": round(t_b, 5), "sequential_step_s": round(t_s, 5),
            "speedup_vs_sequential": round(t_s / t_b, 3), "ratio_vs_cfg": round(t_b / t_cfg, 3),
            "target_ratio_vs_cfg": round((k + 2) / 2 * 1.05, 3), "max_abs_diff": float((out_b - out_s).abs().max()),
            "equal": bool(torch.allclose(out_b.float(), out_s.float(), atol=1e-3 if dtype == torch.float16 else 1e-4)),
            "peak_mem_batched_mb": mem_b and round(mem_b / 2**20, 1), "peak_mem_sequential_mb": mem_s and round(mem_s / 2**20, 1),
        }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
