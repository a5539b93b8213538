"""Frozen (zero-shot) vs CoOp vs DCAR retrieval R@1 on held-out generated captions, tiny random CLIP, CPU.

Prints one JSON line. Usage: python benchmarks/dcar_retrieval.py [--n-train 400 --n-test 200 --epochs 6 --lr 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

BENCH_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from clip_ood.dcar.data import PairDataset, load_pairs
    from clip_ood.dcar.evaluate import evaluate_retrieval
    from clip_ood.dcar.prompts import DualPromptCLIP
    from clip_ood.dcar.synthetic import make_caption_set
    from clip_ood.dcar.train import DCARConfig, train_retrieval
    from clip_ood.encoders import load_encoder, register_model_config

    t0 = time.time()
    work = tempfile.mkdtemp(prefix="dcar_bench_")
    paths = make_caption_set(work, args.n_train, args.n_test, seed=args.seed)
    register_model_config("negvision-dcar-bench", BENCH_CONFIG)
    enc = load_encoder("negvision-dcar-bench", device="cpu", seed=args.seed)
    train, test = load_pairs(paths["train"]), load_pairs(paths["test"])
    test_ds = PairDataset(test, enc.preprocess)
    res: dict[str, dict] = {}
    with torch.no_grad():
        res["frozen"] = evaluate_retrieval(DualPromptCLIP(enc.model, enc.tokenizer, n_ctx=0), test_ds)
    times = {}
    for method in ("coop", "dcar"):
        t = time.time()
        model, _ = train_retrieval(enc.model, enc.tokenizer, enc.preprocess, train, f"{work}/{method}",
                                   DCARConfig(method=method), epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, cpu=True, progress=False)
        times[method] = round(time.time() - t, 1)
        res[method] = evaluate_retrieval(model, test_ds)
    out = {"benchmark": "dcar_retrieval", "model": "tiny random CLIP (width 64, 2+2 layers, patch 8)",
           "data": f"digits-on-textures captions, {args.n_train} train / {args.n_test} held-out",
           "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
           "n_test_texts": len({p.caption for p in test})}
    for name, r in res.items():
        out[f"{name}_i2t_R@1"] = round(r["i2t_R@1"], 2)
        out[f"{name}_t2i_R@1"] = round(r["t2i_R@1"], 2)
        out[f"{name}_mean_recall"] = round(r["mean_recall"], 2)
    out["coop_beats_frozen"] = all(out[f"coop_{d}_R@1"] > out[f"frozen_{d}_R@1"] for d in ("i2t", "t2i"))
    out["dcar_beats_frozen"] = all(out[f"dcar_{d}_R@1"] > out[f"frozen_{d}_R@1"] for d in ("i2t", "t2i"))
    out["dcar_minus_coop_R@1"] = {d: round(out[f"dcar_{d}_R@1"] - out[f"coop_{d}_R@1"], 2) for d in ("i2t", "t2i")}
    out["train_s"] = times
    out["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
