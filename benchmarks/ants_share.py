"""ANTS vs NegLabel on mixed test streams with 10 %, 50 % and 90 % OOD, in three orders (ID first, OOD first,
shuffled): FPR95 / AUROC of each, and the difference (issue: "ANTS at any OOD share").

No real CLIP weights install offline, so the stream lives in a synthetic CLIP-like embedding world (stated, not a
substitute for real figures): every word of a lexicon has a random unit "concept" vector; a text feature is the
normalised mean of its content words' vectors plus a shared text direction; an image of concept c is
normalise(v_c + noise + modality gap). ID classes and OOD concepts are lexicon words, so NegLabel mines its negatives
from the lexicon (``select_negative_labels``) and ANTS's offline ``LexiconDescriber`` can name an OOD image's
concept, as an MLLM would. OOD concepts are half "far" (random) and half "near" (an ID class's vector mixed with
its own). The world, the stream and the per-concept noise are drawn from ``--seed``; report several seeds.

    python benchmarks/ants_share.py --seeds 0,1,2            # the 9 share x order cells, mean over seeds
    python benchmarks/ants_share.py --ants '{"percentile": 1.0}'   # any ANTS option, for comparisons
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_ood.ants import ANTSConfig, ANTSState  # noqa: E402
from clip_ood.describers import LexiconDescriber  # noqa: E402
from clip_ood.encoders import encode_labels  # noqa: E402
from clip_ood.lexicon import select_negative_labels  # noqa: E402
from clip_ood.metrics import ood_metrics  # noqa: E402

STOP = {"the", "nice", "a", "an", "photo", "of", "this", "is", "that"}


class ConceptWorld:
    """A text/image encoder over a word lexicon with known concept vectors (see the module docstring)."""

    def __init__(self, n_words: int, dim: int, seed: int, text_shift: float = 0.6, gap: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.words = [f"w{i:05d}" for i in range(n_words)]
        self.vec = dict(zip(self.words, F.normalize(torch.randn(n_words, dim, generator=g), dim=-1), strict=True))
        self.text_dir = F.normalize(torch.randn(dim, generator=g), dim=0) * text_shift
        self.gap = F.normalize(torch.randn(dim, generator=g), dim=0) * gap

    def set_vector(self, word: str, v: torch.Tensor) -> None:
        self.vec[word] = F.normalize(v, dim=0)

    def _word(self, w: str) -> torch.Tensor:
        if w not in self.vec:  # unknown word: a fixed random vector from its hash
            s = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
            self.vec[w] = F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(s)), dim=0)
        return self.vec[w]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            words = [w for w in re.findall(r"[a-z0-9_]+", t.lower()) if w not in STOP]
            v = torch.stack([self._word(w) for w in words]).mean(0) if words else torch.zeros(self.dim)
            out.append(F.normalize(v + self.text_dir, dim=0))
        return torch.stack(out)

    def images(self, concept: str, n: int, noise: float, g: torch.Generator) -> torch.Tensor:
        v = self.vec[concept]
        x = v + noise * torch.randn(n, self.dim, generator=g) / self.dim ** 0.5 + self.gap
        return F.normalize(x, dim=-1)


def build(seed: int, n_id: int = 20, n_ood: int = 20, n_words: int = 3000, dim: int = 128, noise: float = 1.6,
          near_mix: float = 0.55, n_neg: int = 500):
    g = torch.Generator().manual_seed(seed + 1000)
    world = ConceptWorld(n_words, dim, seed)
    perm = torch.randperm(n_words, generator=g).tolist()
    id_words = [world.words[i] for i in perm[:n_id]]
    ood_words = [world.words[i] for i in perm[n_id:n_id + n_ood]]
    for j, w in enumerate(ood_words[: n_ood // 2]):  # near OOD: mixed with an ID class
        world.set_vector(w, near_mix * world.vec[id_words[j % n_id]] + (1 - near_mix) * world.vec[w])
    template = ("The nice {}.",)
    id_feats = encode_labels(world, id_words, template, cache_dir=False)
    cands = [w for w in world.words if w not in set(id_words)]
    cand_feats = encode_labels(world, cands, template, cache_dir=False)
    chosen = select_negative_labels(cand_feats, id_feats, min(n_neg, len(cands)))
    neg_feats = cand_feats[chosen]
    return world, id_words, ood_words, id_feats, neg_feats, g, noise


ORDERS = ("id_first", "ood_first", "shuffled")


def stream(world, id_words, ood_words, g, noise, n_total: int, ood_share: float, order: str):
    n_ood = int(round(n_total * ood_share))
    n_id = n_total - n_ood
    idc = torch.randint(len(id_words), (n_id,), generator=g)
    oodc = torch.randint(len(ood_words), (n_ood,), generator=g)
    xi = torch.cat([world.images(id_words[c], 1, noise, g) for c in idc.tolist()]) if n_id else torch.zeros(0, world.dim)
    xo = torch.cat([world.images(ood_words[c], 1, noise, g) for c in oodc.tolist()]) if n_ood else torch.zeros(0, world.dim)
    x = torch.cat([xi, xo])
    is_ood = torch.cat([torch.zeros(n_id, dtype=torch.bool), torch.ones(n_ood, dtype=torch.bool)])
    if order == "ood_first":
        idx = torch.cat([torch.arange(n_id, n_total), torch.arange(n_id)])
    elif order == "shuffled":
        idx = torch.randperm(n_total, generator=g)
    else:
        idx = torch.arange(n_total)
    return x[idx], is_ood[idx]


def run_cell(world, id_words, id_feats, neg_feats, x, is_ood, batch: int, seed: int, ants_kw: dict) -> dict:
    describer = LexiconDescriber(world, words=world.words, cache_dir=False)
    kw = dict(ants_kw)
    mode = kw.pop("mode", "ada")
    ants = ANTSState(world, id_words, id_feats, neg_feats, describer=describer, mode=mode,
                     config=ANTSConfig(**{**kw, "seed": seed}))
    steps = [ants.step(x[i:i + batch]) for i in range(0, len(x), batch)]
    scores = torch.cat([o["score"] for o in steps])
    base = torch.cat([o["base"] for o in steps])  # NegLabel itself: ANTS's base score, per image, banks empty
    out = {}
    for name, s in (("neglabel", base), ("ants", scores)):
        m = ood_metrics(s[~is_ood].numpy(), s[is_ood].numpy())
        out[name] = {"fpr95": m["fpr95"], "auroc": m["auroc"]}
    out["ants_final_tau"] = ants.tau
    out["ants_lambda"] = ants.lambda_
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=2000, help="images per stream")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shares", default="0.1,0.5,0.9")
    ap.add_argument("--orders", default="id_first,ood_first,shuffled")
    ap.add_argument("--n-words", type=int, default=3000)
    ap.add_argument("--n-id", type=int, default=20, help="ID classes")
    ap.add_argument("--noise", type=float, default=1.6, help="image noise (higher: harder)")
    ap.add_argument("--near-mix", type=float, default=0.55, help="share of an ID class in a near-OOD concept")
    ap.add_argument("--ants", default="{}", help="ANTS options as JSON: mode and the ANTSConfig fields but seed, "
                    'e.g. \'{"percentile": 0.9}\'')
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
        shares = [float(s) for s in a.shares.split(",")]
    except ValueError as e:
        ap.error(f"--seeds takes integers and --shares numbers, comma-separated: {e}")
    if any(not 0.0 < s < 1.0 for s in shares):
        ap.error(f"--shares must lie strictly between 0 and 1, got {a.shares}")
    orders = a.orders.split(",")
    bad = [o for o in orders if o not in ORDERS]
    if bad:
        ap.error(f"--orders: unknown order(s) {', '.join(bad)}; choose from {', '.join(ORDERS)}")
    try:
        ants_kw = json.loads(a.ants)
    except json.JSONDecodeError as e:
        ap.error(f"--ants is not valid JSON ({e.msg} at character {e.pos}): {a.ants}")
    if not isinstance(ants_kw, dict):
        ap.error(f"--ants must be a JSON object of ANTSState options, got {a.ants}")
    known = {"mode"} | {f.name for f in dataclasses.fields(ANTSConfig)} - {"seed"}
    unknown = sorted(set(ants_kw) - known)
    if unknown:
        ap.error(f"--ants: unknown ANTSState option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    t0 = time.perf_counter()
    cells: dict[str, list[dict]] = {}
    for seed in seeds:
        world, id_words, ood_words, id_feats, neg_feats, g, noise = build(seed, n_words=a.n_words, noise=a.noise,
                                                                          near_mix=a.near_mix, n_id=a.n_id)
        for share in shares:
            for order in orders:
                x, is_ood = stream(world, id_words, ood_words, g, noise, a.n, share, order)
                cells.setdefault(f"{share:.0%} OOD, {order}", []).append(
                    run_cell(world, id_words, id_feats, neg_feats, x, is_ood, a.batch, seed, ants_kw))
    print(f"{'stream':<22} {'NegLabel FPR95':>15} {'ANTS FPR95':>12} {'diff':>8} {'NegLabel AUROC':>15} "
          f"{'ANTS AUROC':>11}")
    summary = {}
    worst = -1.0
    for key, rs in cells.items():
        f_n = np.array([r["neglabel"]["fpr95"] for r in rs])
        f_a = np.array([r["ants"]["fpr95"] for r in rs])
        a_n = np.array([r["neglabel"]["auroc"] for r in rs])
        a_a = np.array([r["ants"]["auroc"] for r in rs])
        d = float((f_a - f_n).mean())
        worst = max(worst, d)
        summary[key] = {"neglabel_fpr95": float(f_n.mean()), "ants_fpr95": float(f_a.mean()), "diff_fpr95": d,
                        "neglabel_auroc": float(a_n.mean()), "ants_auroc": float(a_a.mean()), "runs": rs}
        print(f"{key:<22} {f_n.mean():>8.4f}±{f_n.std():.3f} {f_a.mean():>6.4f}±{f_a.std():.3f} {d:>+8.4f} "
              f"{a_n.mean():>15.4f} {a_a.mean():>11.4f}")
    verdict = {"worst_diff_fpr95": worst, "never_worse_by_0.005": worst <= 0.005,
               "better_somewhere": any(v["diff_fpr95"] < 0 for v in summary.values())}
    print(json.dumps({"benchmark": "ants_share", "seeds": seeds, "n": a.n, "ants": ants_kw, **verdict,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    result = {"cells": summary, **verdict}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
