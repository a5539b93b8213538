"""OOD scoring throughput: image-encoder time vs NegLabel scoring time with 10,000 negatives (one JSON line).

Target: scoring adds under 10% to the image encoder's forward. Text features are random unit vectors of the model's
embedding size (scoring cost does not depend on their content; real ones are encoded once and cached). The model is
randomly initialised (no download). CPU default: ViT-B-32, batch 16.

    python benchmarks/ood_throughput.py [--model ViT-B-16] [--device cuda] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, repeats: int) -> list[float]:
    fn()  # warm-up
    _sync(dev)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or 'tiny' (random tiny config)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-negatives", type=int, default=10_000)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--num-groups", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F

    from clip_ood.encoders import TINY_CONFIG, load_encoder, register_model_config
    from clip_ood.scores import mcm_score, neglabel_score, neglabel_score_prepared, prepare_negatives

    name = a.model
    if name == "tiny":
        name = register_model_config("negvision-tiny-bench", TINY_CONFIG)
    enc = load_encoder(name, device=a.device, precision=a.precision)
    dev = enc.device
    size = enc.model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(a.batch_size, 3, *size, device=dev)
    dim = enc.encode_image(images[:1]).shape[-1]
    g = torch.Generator().manual_seed(0)
    id_t = F.normalize(torch.randn(a.num_classes, dim, generator=g), dim=-1).to(dev)
    neg_t = F.normalize(torch.randn(a.num_negatives, dim, generator=g), dim=-1).to(dev)
    feats = enc.encode_image(images)

    enc_s = _time(lambda: enc.encode_image(images), dev, a.repeats)
    neg_p, groups = prepare_negatives(neg_t, a.num_groups, 0)  # once per negative set, as OODScorer does
    neg_s = _time(lambda: neglabel_score_prepared(feats, id_t, neg_p, groups, 0.01), dev, a.repeats * 3)
    full_s = _time(lambda: neglabel_score(feats, id_t, neg_t, 0.01, a.num_groups, 0), dev, a.repeats)
    mcm_s = _time(lambda: mcm_score(feats, id_t), dev, a.repeats * 3)
    e, s, m = statistics.median(enc_s), statistics.median(neg_s), statistics.median(mcm_s)
    print(json.dumps({
        "benchmark": "ood_throughput", "device": str(dev), "model": a.model, "precision": a.precision,
        "weights": "random", "batch_size": a.batch_size, "num_negatives": a.num_negatives,
        "num_classes": a.num_classes, "num_groups": a.num_groups, "embed_dim": dim,
        "encoder_ms_per_batch": round(1000 * e, 3), "neglabel_ms_per_batch": round(1000 * s, 3),
        "neglabel_unprepared_ms_per_batch": round(1000 * statistics.median(full_s), 3),
        "mcm_ms_per_batch": round(1000 * m, 3), "scoring_overhead_pct": round(100 * s / e, 2),
        "target_overhead_pct": 10.0, "meets_target": s / e < 0.10,
        "images_per_s_encoder_plus_neglabel": round(a.batch_size / (e + s), 2),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "repeats": a.repeats,
    }))


if __name__ == "__main__":
    main()
