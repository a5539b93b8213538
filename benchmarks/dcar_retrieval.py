"""Frozen (zero-shot) CLIP vs CoOp vs DCAR: image-text retrieval R@K on held-out generated captions, CPU.

A prompt learner needs a CLIP that already knows something: no real CLIP weights install offline, so the
script first pre-trains a tiny open_clip CLIP (all weights, open_clip's ``ClipLoss``) on a *source* corpus and
then adapts it to a *target* task with prompts only, the CLIP frozen:

- image tower first (``--sup-epochs``, default 10; 0 = off): trained with a linear head on the source images'
  digit classes (cross-entropy), as CLIP image towers often start from supervised ImageNet weights. Without
  it the tiny ViT learns almost no digit shape from the captions alone (frozen image features: 21 % digit
  accuracy with a linear probe on 10 classes; even supervised training of the same tower on 3,000 images
  reached 45 %), so no prompt method has class knowledge to bring out; with it: 79 %;
- source corpus: ``--n-pretrain`` digits-on-textures images with web-style partial captions — a random
  non-empty subset of "{digit}", "{colour} ink", "{background} texture" in random order, e.g. "grass texture,
  seven" — so the model never sees the target caption template ("a red seven digit on a grass background"):
  the words "a", "digit", "on", "background" keep their random embeddings;
- target task: ``--n-train`` pairs for prompt learning and ``--n-test`` held-out pairs (disjoint MNIST drawings)
  with the full captions of ``clip_ood.dcar.synthetic``; ``--shift bright`` also changes the target images
  (background brightened: x -> 0.35 + 0.65 x), a covariate shift that only visual prompts can follow.
  The source corpus re-renders the 4,000 training drawings (colour, background and position drawn anew), so
  with ``--n-pretrain`` above 4,000 source and target pairs share drawings; the test drawings are disjoint.

Frozen / CoOp / DCAR are evaluated on the same held-out set; CoOp and DCAR are trained with ``--seeds`` seeds
(mean and standard deviation printed). ``--ablation`` adds DCAR without each component (seed 0 only).
``--ceiling`` adds two upper bounds that are not prompt methods: every weight of the image tower, then of the
text tower, fine-tuned on the same target pairs with DCAR's batches and loss (seed 0, best validation epoch).
Prints one JSON line. Usage: python benchmarks/dcar_retrieval.py [--shift none|bright] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

BENCH_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
ABLATIONS = {"with_attribute_loss": {"lambda_attr": 0.5}, "no_extra_negatives": {"k_neg": 0},
             "no_category_weighting": {"alpha": 0.0}, "no_visual_prompts": {"n_vis": 0},
             "no_hard_batches": {"hard_share": 0.0}}
# the choices looked at on the validation split (--choose): DCAR with each, seed 0, validation R@1 only
CHOICES = {"hard_0": {"hard_share": 0.0}, "hard_0.25": {"hard_share": 0.25}, "hard_0.5": {"hard_share": 0.5},
           "hard_1": {"hard_share": 1.0}, "attr_0": {"lambda_attr": 0.0}, "attr_0.5": {"lambda_attr": 0.5},
           "attr_0.1": {"lambda_attr": 0.1}}


def web_caption(pair, rng: random.Random) -> str:
    """A partial, reordered caption of a generated pair (the source corpus' style)."""
    colour, bg = (a.split()[0] for a in pair.attributes)
    frags = [pair.category, f"{colour} ink", f"{bg} texture"]
    return ", ".join(rng.sample(frags, rng.randint(1, 3)))


def brighten(preprocess):
    """Target-domain images: x -> 0.35 + 0.65 x (in [0, 1]) before the CLIP preprocessing."""
    import numpy as np
    from PIL import Image

    def fn(img):
        a = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
        return preprocess(Image.fromarray(((0.35 + 0.65 * a) * 255).round().astype(np.uint8)))

    return fn


def source_batches(dataset, epochs: int, batch_size: int, rng: random.Random):
    """(indices, collated batch) over ``epochs`` passes of the source pairs, each pass shuffled by ``rng``."""
    from clip_ood.dcar.data import collate_pairs

    for _ in range(epochs):
        order = list(range(len(dataset)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield idx, collate_pairs([dataset[j] for j in idx])


def pretrain_image_tower(model, dataset, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """Supervised start of the image tower: a linear head on the pooled features, cross-entropy on the digit
    classes of the source pairs (AdamW); the head is thrown away."""
    import torch
    import torch.nn.functional as F


    rng = random.Random(seed)
    torch.manual_seed(seed)
    classes = sorted({p.category for p in dataset.pairs})
    y_all = [classes.index(p.category) for p in dataset.pairs]
    vis = model.visual
    head = torch.nn.Linear(int(vis.output_dim), len(classes))
    for p in vis.parameters():
        p.requires_grad_(True)
    vis.train()
    opt = torch.optim.AdamW(list(vis.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.1)
    t0, loss = time.time(), torch.tensor(float("nan"))
    for idx, b in source_batches(dataset, epochs, batch_size, rng):
        loss = F.cross_entropy(head(vis(b["images"])), torch.tensor([y_all[j] for j in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vis.eval()
    return {"final_loss": round(float(loss.detach()), 3), "seconds": round(time.time() - t0, 1)}


def pretrain_clip(model, tokenizer, dataset, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """Contrastive pre-training of every CLIP weight on web-style captions (open_clip's ClipLoss, AdamW)."""
    import torch
    from open_clip.loss import ClipLoss


    rng = random.Random(seed)
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    t0, loss = time.time(), torch.tensor(float("nan"))
    for idx, b in source_batches(dataset, epochs, batch_size, rng):
        caps = [web_caption(dataset.pairs[j], rng) for j in idx]
        img = model.encode_image(b["images"], normalize=True)
        txt = model.encode_text(tokenizer(caps), normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"final_loss": round(float(loss.detach()), 3), "seconds": round(time.time() - t0, 1)}


def finetune_tower(clip, tokenizer, train_pairs, train_ds, val_ds, tower: str, epochs: int, lr: float,
                   batch_size: int, seed: int):
    """Upper bound for any adaptation of one tower: a copy of the pre-trained CLIP with every weight of the image
    (``tower="image"``) or the text tower (``"text"``) trained, not prompts. Same data, batches and loss as DCAR
    (hard-negative batches, 3 class-swapped captions per image, contrastive loss with category weighting off),
    AdamW at a constant ``lr``; the epoch with the best validation R@1 (mean of both directions) is kept.
    Returns the learner (a ``DualPromptCLIP`` with no prompts around the fine-tuned copy) and the best epoch."""
    import copy

    import torch

    from clip_ood.dcar.data import HardNegativeBatchSampler, categories_of, collate_pairs
    from clip_ood.dcar.evaluate import evaluate_retrieval
    from clip_ood.dcar.prompts import DualPromptCLIP
    from clip_ood.dcar.train import DCARConfig, RetrievalLoss

    torch.manual_seed(seed)
    net = copy.deepcopy(clip)
    learner = DualPromptCLIP(net, tokenizer, n_ctx=0)  # freezes every weight of net; unfreeze one tower
    if tower == "image":
        params = list(net.visual.parameters())
    else:
        vis = {id(p) for p in net.visual.parameters()}
        params = [p for p in net.parameters() if id(p) not in vis and p is not net.logit_scale]
    for p in params:
        p.requires_grad_(True)
    loss_fn = RetrievalLoss(DCARConfig(method="dcar", alpha=0.0, lambda_attr=0.0), categories_of(train_pairs),
                            None, seed)
    sampler = HardNegativeBatchSampler(train_pairs, batch_size, 1.0, 4, seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_pairs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    best, best_state, best_epoch = -1.0, None, -1
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for b in loader:
            loss = loss_fn(learner, b)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            r = _r1(evaluate_retrieval(learner, val_ds))
        if r["R@1"] > best:
            best, best_epoch = r["R@1"], epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(False)
    return learner, best_epoch


def _r1(r: dict) -> dict:
    return {"i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"], "R@1": (r["i2t_R@1"] + r["t2i_R@1"]) / 2,
            "mean_recall": r["mean_recall"]}


def _agg(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = round(statistics.mean(vals), 2)
        if len(vals) > 1:
            out[k + "_std"] = round(statistics.stdev(vals), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pretrain", type=int, default=15000)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=500, help="Target validation pairs (model choices, best epoch).")
    ap.add_argument("--choose", action="store_true", help="Also train the CHOICES variants, report validation R@1.")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--sup-epochs", type=int, default=10,
                    help="Supervised digit-class epochs of the image tower before the caption pre-training (0 = off).")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shift", choices=("none", "bright"), default="none")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--ceiling", action="store_true",
                    help="Also fine-tune every weight of the image tower, then of the text tower (seed 0, lr 1e-4, "
                         "--ceiling-epochs, best validation epoch): what any adaptation of one tower could reach here.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ceiling-epochs", type=int, default=12)
    args = ap.parse_args()
    if args.ceiling and args.n_val < 1:
        ap.error("--ceiling selects the best epoch on the validation split: give --n-val 1 or more")

    import torch

    torch.set_num_threads(args.threads)
    from clip_ood.dcar.data import PairDataset, load_pairs
    from clip_ood.dcar.evaluate import evaluate_retrieval
    from clip_ood.dcar.prompts import DualPromptCLIP
    from clip_ood.dcar.synthetic import make_caption_set
    from clip_ood.dcar.train import DCARConfig, train_retrieval
    from clip_ood.encoders import load_encoder, register_model_config
    from vision.engine import RunOptions, TrainConfig

    t0 = time.time()
    work = tempfile.mkdtemp(prefix="dcar_bench_")
    paths = make_caption_set(work, args.n_pretrain + args.n_train + args.n_val, args.n_test, seed=0)
    register_model_config("negvision-dcar-bench", BENCH_CONFIG)
    enc = load_encoder("negvision-dcar-bench", device="cpu", seed=0)
    pool = load_pairs(paths["train"])
    source = pool[: args.n_pretrain]
    target_train = pool[args.n_pretrain : args.n_pretrain + args.n_train]
    val = pool[args.n_pretrain + args.n_train :]
    test = load_pairs(paths["test"])
    source_ds = PairDataset(source, enc.preprocess)
    sup = pretrain_image_tower(enc.model, source_ds, args.sup_epochs, 128, 1e-3, seed=0) if args.sup_epochs else None
    pre = pretrain_clip(enc.model, enc.tokenizer, source_ds, args.pretrain_epochs, 128, 1e-3, seed=0)
    pre["image_tower_supervised"] = sup
    target_pp = brighten(enc.preprocess) if args.shift == "bright" else enc.preprocess
    test_ds = PairDataset(test, target_pp)
    val_ds = PairDataset(val, target_pp) if val else None
    with torch.no_grad():
        zero = DualPromptCLIP(enc.model, enc.tokenizer, n_ctx=0)
        frozen = _r1(evaluate_retrieval(zero, test_ds))
        frozen_val = _r1(evaluate_retrieval(zero, val_ds)) if val_ds is not None else None
    runs: dict[str, list[dict]] = {"coop": [], "dcar": []}
    times: dict[str, list[float]] = {"coop": [], "dcar": []}
    val_runs: dict[str, dict] = {}
    if args.choose:  # every choice on the validation split only (seed 0)
        for name, over in CHOICES.items():
            model, _ = train_retrieval(enc.model, enc.tokenizer, target_pp, target_train, val,
                                       DCARConfig(method="dcar", **over),
                                       TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0),
                                       RunOptions(out=f"{work}/choice_{name}", device="cpu", progress=False))
            val_runs[name] = {k: round(v, 2) for k, v in _r1(evaluate_retrieval(model, val_ds)).items()}
            print(f"val {name}: {val_runs[name]}", file=sys.stderr, flush=True)
    jobs = [(m, {}, s) for s in range(args.seeds) for m in ("coop", "dcar")]
    if args.ablation:
        jobs += [(name, over, 0) for name, over in ABLATIONS.items()]
    for name, over, seed in jobs:
        method = name if name in ("coop", "dcar") else "dcar"
        t = time.time()
        model, _ = train_retrieval(enc.model, enc.tokenizer, target_pp, target_train, val or None,
                                   DCARConfig(method=method, **over),
                                   TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed),
                                   RunOptions(out=f"{work}/{name}_{seed}", device="cpu", progress=False))
        runs.setdefault(name, []).append(_r1(evaluate_retrieval(model, test_ds)))
        times.setdefault(name, []).append(time.time() - t)
    if args.ceiling:
        train_ds = PairDataset(target_train, target_pp)
        for tower in ("image", "text"):
            t = time.time()
            model, best_epoch = finetune_tower(enc.model, enc.tokenizer, target_train, train_ds, val_ds, tower,
                                               epochs=args.ceiling_epochs, lr=1e-4, batch_size=args.batch_size, seed=0)
            name = f"finetune_{tower}_tower"
            runs[name] = [_r1(evaluate_retrieval(model, test_ds))]
            times[name] = [time.time() - t]
            print(f"{name}: best epoch {best_epoch}, test {runs[name][0]}", file=sys.stderr, flush=True)
    res = {"frozen": {k: round(v, 2) for k, v in frozen.items()}}
    res.update({name: _agg(r) for name, r in runs.items()})
    out = {"benchmark": "dcar_retrieval", "threads": args.threads,
           "model": "tiny open_clip CLIP (width 64, 2+2 layers, patch 8, 32 px), pre-trained here on web-style "
                    "partial captions" + (f" after {args.sup_epochs} supervised digit-class epochs of the image tower"
                                          if args.sup_epochs else ""),
           "data": f"digits on textures: {args.n_pretrain} source / {args.n_train} target train / "
                   f"{args.n_test} held-out target (disjoint MNIST drawings), target shift: {args.shift}",
           "n_test_texts": len({p.caption for p in test}), "pretrain": pre,
           "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds, "results": res,
           "train_s": {k: round(statistics.mean(v), 1) for k, v in times.items()},
           "validation": {"n_val": len(val), "frozen": frozen_val and {k: round(v, 2) for k, v in frozen_val.items()},
                          "choices": val_runs}}
    for m in ("coop", "dcar"):
        out[f"{m}_beats_frozen_R@1"] = {d: res[m][d] > res["frozen"][d] for d in ("i2t_R@1", "t2i_R@1", "R@1")}
    out["dcar_minus_coop"] = {d: round(res["dcar"][d] - res["coop"][d], 2)
                              for d in ("i2t_R@1", "t2i_R@1", "R@1", "mean_recall")}
    out["dcar_minus_frozen"] = {d: round(res["dcar"][d] - res["frozen"][d], 2)
                                for d in ("i2t_R@1", "t2i_R@1", "R@1", "mean_recall")}
    out["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
