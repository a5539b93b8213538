"""Perp-Neg per-step cost on flow-matching transformers: PerpNegStableDiffusion3Pipeline / PerpNegFluxPipeline with
K = 1 and K = 2 negatives vs diffusers' plain CFG (SD3: guidance_scale; Flux: true CFG with negative_prompt ""), same
tiny random transformer, prompts and seed.

A step's time is the gap between consecutive ``callback_on_step_end`` calls (text encoding and decoding are left
out); the modes take turns call by call (interleaved repeats) after a warm-up, and the medians, the ratio to CFG and the
target (K + 2) / 2 (the transformer batch grows from 2 to K + 2 samples) are printed as ONE JSON line (a table goes
to stderr). For Flux, ``no_cfg_step_ms`` is the distilled model's single pass (what Flux.1-dev costs without CFG).

    python benchmarks/perpneg_flow_step.py [--families sd3,flux] [--size 64] [--hidden 96] [--layers 3] [--steps 5]
        [--repeats 8] [--threads 1] [--guider]

``--guider`` adds ``guider_vs_pipeline``: diffusers' modular SD3 pipeline with ``PerpNegGuidance`` (one transformer call
per slot, and with ``batch_slots=True`` one per step) against the classic ``PerpNegStableDiffusion3Pipeline`` on the
same model (whole-call time divided by the steps, text encoding included
for both; the largest difference of their latents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="sd3,flux")
    p.add_argument("--size", type=int, default=64, help="image size (latents are half as large)")
    p.add_argument("--hidden", type=int, default=96, help="transformer width (a multiple of 16)")
    p.add_argument("--layers", type=int, default=3, help="transformer blocks (Flux: this many double + single)")
    p.add_argument("--max-seq", type=int, default=32, help="T5 tokens (max_sequence_length)")
    p.add_argument("--steps", type=int, default=5, help="denoising steps per call (steps - 1 timed gaps)")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per mode first")
    p.add_argument("--guider", action="store_true", help="also time the modular SD3 pipeline with PerpNegGuidance")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: steadier figures on a shared CPU; 0: torch's default)")
    a = p.parse_args(argv)

    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from diffusion.perpneg.pipeline_flux import PerpNegFluxPipeline
    from diffusion.perpneg.pipeline_sd3 import PerpNegStableDiffusion3Pipeline
    from diffusion.perpneg.tiny import make_tiny_flux_components, make_tiny_sd3_components

    if a.threads:
        torch.set_num_threads(a.threads)
    logging_off()
    negs = ["a dog", "green grass"]
    out = {"benchmark": "perpneg_flow_step", "device": "cpu", "threads": torch.get_num_threads(), "image": a.size,
           "hidden": a.hidden, "layers": a.layers, "max_seq": a.max_seq, "steps": a.steps, "repeats": a.repeats}
    tmp = tempfile.mkdtemp()
    for family in a.families.split(","):
        common = dict(num_inference_steps=a.steps, output_type="latent", max_sequence_length=a.max_seq,
                      height=a.size, width=a.size)
        if family == "sd3":
            comps = make_tiny_sd3_components(tmp, sample_size=a.size // 2, hidden=a.hidden, num_layers=a.layers)
            ours, stock = PerpNegStableDiffusion3Pipeline(**comps), StableDiffusion3Pipeline(**comps)
            common["guidance_scale"] = 5.0
            modes = {"cfg": (stock, {}), "k1": (ours, {"negative_prompts": negs[:1]}),
                     "k2": (ours, {"negative_prompts": negs})}
        elif family == "flux":
            comps = make_tiny_flux_components(tmp, sample_size=a.size // 2, hidden=a.hidden, num_layers=a.layers)
            ours, stock = PerpNegFluxPipeline(**comps), FluxPipeline(**comps)
            common["true_cfg_scale"] = 4.0
            modes = {"no_cfg": (stock, {"true_cfg_scale": 1.0}), "cfg": (stock, {"negative_prompt": ""}),
                     "k1": (ours, {"negative_prompts": negs[:1]}), "k2": (ours, {"negative_prompts": negs})}
        else:
            p.error(f"unknown family {family!r} (sd3, flux)")
        for pipe in (ours, stock):
            pipe.set_progress_bar_config(disable=True)

        def run(mode: str, modes=modes, common=common) -> list[float]:
            pipe, kw = modes[mode]
            stamps: list[float] = []

            def stamp(_p, _i, _t, _kw):
                stamps.append(time.perf_counter())
                return {}

            with torch.no_grad():
                pipe("a red cat on a sofa", generator=torch.Generator().manual_seed(0), callback_on_step_end=stamp,
                     **{**common, **kw})
            return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)]  # one gap per step after the first

        for _ in range(a.warmup):
            for mode in modes:
                run(mode)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(a.repeats):  # interleaved: a change in machine load hits every mode alike
            for mode in modes:
                times[mode] += run(mode)
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        res = {"cfg_step_ms": round(med["cfg"], 3), "k": {}}
        if "no_cfg" in med:
            res["no_cfg_step_ms"] = round(med["no_cfg"], 3)
        for k in (1, 2):
            res["k"][str(k)] = {"step_ms": round(med[f"k{k}"], 3), "ratio_vs_cfg": round(med[f"k{k}"] / med["cfg"], 3),
                                "target_ratio_vs_cfg": (k + 2) / 2}
        out[family] = res
        for m, v in med.items():
            print(f"{family:5s} {m:7s} {v:9.2f} ms/step  x{v / med['cfg']:.2f} CFG", file=sys.stderr)
    if a.guider:
        out["guider_vs_pipeline"] = guider_vs_pipeline(a, tmp)
    print(json.dumps(out))
    return 0


def guider_vs_pipeline(a: argparse.Namespace, tmp: str) -> dict:
    """Modular SD3 + PerpNegGuidance (one transformer call per slot, as every diffusers guider) vs the classic
    pipeline (one batched call) on the same tiny model: ms per step (whole calls) and the largest latent difference."""
    import torch
    from diffusers.modular_pipelines import stable_diffusion_3

    from diffusion.perpneg.guider import PerpNegGuidance, perp_neg_blocks
    from diffusion.perpneg.pipeline_sd3 import PerpNegStableDiffusion3Pipeline
    from diffusion.perpneg.tiny import make_tiny_sd3_components

    comps = make_tiny_sd3_components(tmp, sample_size=a.size // 2, hidden=a.hidden, num_layers=a.layers)
    classic = PerpNegStableDiffusion3Pipeline(**comps)
    classic.set_progress_bar_config(disable=True)
    modular = perp_neg_blocks(stable_diffusion_3.StableDiffusion3AutoBlocks()).init_pipeline()
    modular.update_components(**comps)
    guiders = {"guider": PerpNegGuidance(guidance_scale=5.0),  # one call per slot (diffusers' convention)
               "guider_batched": PerpNegGuidance(guidance_scale=5.0, batch_slots=True)}  # one call per step
    negs = ["a dog", "green grass"]
    common = dict(num_inference_steps=a.steps, height=a.size, width=a.size, max_sequence_length=a.max_seq)

    def run(which: str, k: int) -> tuple[float, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            if which == "classic":
                x = classic("a red cat on a sofa", guidance_scale=5.0, negative_prompts=negs[:k], generator=g,
                            output_type="latent", **common).images
            else:
                modular.update_components(guider=guiders[which])
                x = modular(prompt="a red cat on a sofa", negative_prompts=negs[:k], generator=g, output="latents",
                            **common)
        return (time.perf_counter() - t0) / a.steps, x

    res: dict = {}
    for k in (1, 2):
        t: dict[str, list[float]] = {"classic": [], **{w: [] for w in guiders}}
        for _ in range(a.warmup):
            for which in t:
                run(which, k)
        for _ in range(a.repeats):
            for which in t:
                t[which].append(run(which, k)[0])
        ref = run("classic", k)[1]
        c = statistics.median(t["classic"]) * 1e3
        row: dict = {"classic_ms_per_step": round(c, 3)}
        for w in guiders:
            g = statistics.median(t[w]) * 1e3
            diff = float((ref - run(w, k)[1]).abs().max())
            row.update({f"{w}_ms_per_step": round(g, 3), f"{w}_vs_classic": round(g / c, 3),
                        f"{w}_max_abs_diff": diff})
            print(f"{w} K={k}: classic {c:.2f} ms/step, {w} {g:.2f} ms/step (x{g / c:.2f}), max diff {diff:.2e}",
                  file=sys.stderr)
        res[str(k)] = row
    return res


def logging_off() -> None:
    """Silence the expected per-call warnings (Perp-Neg on distilled Flux costs K + 2 passes) and diffusers' notes."""
    import logging

    from diffusers.utils import logging as dlogging

    logging.getLogger("negvision.perpneg").setLevel(logging.ERROR)
    dlogging.set_verbosity_error()


if __name__ == "__main__":
    raise SystemExit(main())
