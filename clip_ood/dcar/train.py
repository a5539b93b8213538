"""DCAR / CoOp training through the shared engine (``vision.engine.Trainer``); only prompt parameters train.

DCAR objective (per step, batch of B pairs):  L = L_cat + lambda_attr * L_attr, with L_cat the
category-matching weighted contrastive loss of :mod:`.losses` (in-batch negatives + ``k_neg`` extra negative
captions per image: FDRD ``negative`` captions first, then class-name swaps) and L_attr the MI-weighted
attribute loss of :mod:`.attributes` (weights re-estimated at fit start and after every epoch).
CoOp: text context only, plain symmetric InfoNCE (alpha = 0, no extra negatives, no attribute loss).
Both mask in-batch captions identical to the positive (false negatives).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vision.seeding import sample_seed

from .attributes import attribute_labels, attribute_loss, ema_update, mi_weights
from .data import Pair, PairDataset, attribute_vocab, categories_of, collate_pairs, sample_negatives
from .losses import category_similarity, negative_weights, same_text_mask, weighted_contrastive_loss
from .prompts import DualPromptCLIP

if TYPE_CHECKING:
    from vision.engine import RunOptions, TrainConfig

METHODS = ("dcar", "coop")
# the task's values of the TrainConfig fields left None ("the task's default")
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 10, "lr": 2e-3, "optimizer": "adamw", "weight_decay": 0.0,
                                  "scheduler": "cosine", "batch_size": 32}
PROMPTS_WEIGHTS = "prompts.safetensors"
PROMPTS_CONFIG = "prompts.json"


@dataclass
class DCARConfig:
    """Method settings of the retrieval task (prompt shapes, loss weights, batch grouping, validation share)."""

    method: str = "dcar"
    n_ctx: int = 4
    ctx_init: str | None = None  # e.g. "a photo of a" (then n_ctx = its token count)
    class_specific: bool = False
    n_vis: int = 4  # visual prompt tokens (dcar); coop uses 0
    vis_depth: int | None = None  # layers with fresh visual prompts; None = all (max 9, as MaPLe)
    alpha: float = 1.0  # category-matching weight: w = 1 + alpha * m
    k_neg: int = 3  # extra negative captions per image
    lambda_attr: float = 0.0  # the MI-weighted attribute term is off: it did not help on the validation split
    attr_tau: float = 0.25  # softmax temperature of the NMI -> weight map
    attr_eta: float = 0.5  # EMA step of the attribute weights
    attr_bins: int = 8
    attr_max_pairs: int = 512
    attr_text_grad: bool = False  # True: the attribute loss also trains the text context (hurt t2i R@1 here)
    hard_share: float = 1.0  # share of each batch in same-attributes / other-category groups (dcar; coop: 0)
    hard_group: int = 4  # pairs per such group
    val_split: float = 0.15  # without validation pairs: the share of training images held out (0 = none)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got '{self.method}'")


def build_learner(clip: torch.nn.Module, tokenizer, cfg: DCARConfig, categories: Sequence[str]) -> DualPromptCLIP:
    """The prompt learner for ``cfg.method`` around a frozen open_clip model."""
    n_vis = cfg.n_vis if cfg.method == "dcar" else 0
    depth = cfg.vis_depth
    if n_vis and depth is None:
        depth = min(9, len(clip.visual.transformer.resblocks))
    return DualPromptCLIP(clip, tokenizer, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init,
                          class_specific=cfg.class_specific, categories=categories, n_vis=n_vis,
                          vis_depth=depth or 1)


@torch.no_grad()
def category_text_features(model: DualPromptCLIP, categories: Sequence[str]) -> Tensor:
    """Frozen-CLIP features of "a photo of a {c}" (for the category-matching similarity m)."""
    with model.disabled():
        return model.encode_text([f"a photo of a {c}" for c in categories], normalize=True).float()


class RetrievalLoss:
    """``loss_fn(model, batch[, ctx])`` for the engine: DCAR (weighted negatives + attributes) or CoOp (InfoNCE).

    The swapped-class negatives of a batch are drawn from ``(seed, epoch, batch index)`` when the engine passes its
    context (so a resumed run draws what the uninterrupted one drew), else from one generator seeded once."""

    def __init__(self, cfg: DCARConfig, categories: Sequence[str], cat_sim: Tensor | None, seed: int = 0):
        self.cfg = cfg
        self.categories = list(categories)
        self.cat_index = {c: i for i, c in enumerate(self.categories)}
        self.cat_sim = cat_sim
        self.seed = int(seed)
        self.rng = random.Random(seed)

    def _ids(self, cats: Sequence[str | None], device) -> Tensor:
        return torch.tensor([self.cat_index.get(c, -1) if c is not None else -1 for c in cats], device=device)

    def __call__(self, model, batch: dict, ctx: Any = None) -> dict[str, Tensor]:
        cfg = self.cfg
        rng = self.rng if ctx is None else random.Random(sample_seed(self.seed, ctx.epoch, ctx.batch_in_epoch))
        inner = model.module if hasattr(model, "module") else model
        caps, cats = batch["captions"], batch["categories"]
        B = len(caps)
        dcar = cfg.method == "dcar"
        texts, tcats = list(caps), list(cats)
        negs: list[list[tuple[str, str | None]]] = []
        if dcar and cfg.k_neg > 0:
            for cap, cat, given in zip(caps, cats, batch["negatives"], strict=True):
                negs.append(sample_negatives(cap, cat, given, self.categories, cfg.k_neg, rng))
            K = min(len(n) for n in negs)  # equal K per image keeps the tensors rectangular
            negs = [n[:K] for n in negs]
            for n in negs:
                texts += [t for t, _ in n]
                tcats += [c for _, c in n]
        else:
            K = 0
        vocab = inner.attr_vocab if dcar and cfg.lambda_attr > 0 else []
        texts += list(vocab)
        tcats += [None] * len(vocab)
        img, txt = model(batch["images"], texts, tcats if inner.class_specific else None)
        cap_f = txt[:B]
        neg_f = txt[B : B + B * K].view(B, K, -1) if K else None
        scale = inner.logit_scale.exp()
        # false negatives: in-batch captions identical to the positive get weight 0
        same = same_text_mask(caps).to(img.device)
        if dcar and self.cat_sim is not None:
            ids = self._ids(cats, img.device)
            w_batch = negative_weights(self.cat_sim.to(img.device), ids, ids, cfg.alpha)
            w_neg = None
            if K:
                nid = self._ids([c for n in negs for _, c in n], img.device).view(B, K)
                w_neg = torch.stack([negative_weights(self.cat_sim.to(img.device), ids[i : i + 1], nid[i],
                                                      cfg.alpha)[0] for i in range(B)])
        else:
            w_batch = torch.ones(B, B, device=img.device)
            w_neg = None
        w_batch = w_batch.masked_fill(same, 0.0)
        out = weighted_contrastive_loss(img, cap_f, scale, w_batch=w_batch, neg_txt=neg_f, w_neg=w_neg)
        if vocab:
            attr_f = txt[B + B * K :]
            if not cfg.attr_text_grad:
                attr_f = attr_f.detach()
            labels = attribute_labels(batch["attributes"], vocab).to(img.device)
            l_attr = attribute_loss(img, attr_f, labels, inner.attr_weights, scale)
            out["loss_cat"] = out["loss"]
            out["loss_attr"] = l_attr
            out["loss"] = out["loss"] + cfg.lambda_attr * l_attr
        return out


class AttributeReweighting:
    """Engine callback: re-estimate the attribute weights from text-image MI at fit start and each epoch end."""

    def __init__(self, dataset: PairDataset, cfg: DCARConfig, seed: int = 0):
        self.dataset = dataset
        self.cfg = cfg
        n = len(dataset)
        idx = list(range(n))
        random.Random(seed).shuffle(idx)
        self.idx = sorted(idx[: cfg.attr_max_pairs])
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def update(self, model: DualPromptCLIP) -> Tensor:
        """One EMA step of the weights from the NMI on the sampled training pairs; returns the NMI."""
        vocab = model.attr_vocab
        was = model.training
        model.eval()
        try:
            dev = model.ctx.device
            feats = []
            for i in range(0, len(self.idx), 64):
                b = collate_pairs([self.dataset[j] for j in self.idx[i : i + 64]])
                feats.append(model.encode_image(b["images"].to(dev), normalize=True).float().cpu())
            img = torch.cat(feats)
            att = model.encode_text(vocab, [None] * len(vocab) if model.class_specific else None,
                                    normalize=True).float().cpu()
        finally:
            model.train(was)
        labels = attribute_labels([self.dataset.pairs[j].attributes for j in self.idx], vocab)
        nmi, w_new = mi_weights(img, att, labels, tau=self.cfg.attr_tau, n_bins=self.cfg.attr_bins)
        model.attr_weights = ema_update(model.attr_weights.cpu(), w_new, self.cfg.attr_eta).to(dev)
        self.history.append({"nmi": nmi.tolist(), "weights": model.attr_weights.cpu().tolist()})
        return nmi

    def __call__(self, trainer, event: str, info: dict) -> None:
        if event == "fit_start" and info.get("resumed_from"):
            return  # a resumed run has the weights of its checkpoint (a buffer of the learner)
        if event in ("fit_start", "epoch_end") and trainer.is_main:
            self.update(trainer.unwrapped_model)


def save_prompts(model: DualPromptCLIP, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write prompts.safetensors + prompts.json atomically into ``out_dir``; returns the weights path."""
    from safetensors.torch import save

    from vision.io import write_bytes_atomic, write_text_atomic

    out = Path(out_dir)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / PROMPTS_WEIGHTS, save(sd))
    cfg = {**model.prompt_config(), **(extra or {})}
    write_text_atomic(out / PROMPTS_CONFIG, json.dumps(cfg, indent=2))
    return out / PROMPTS_WEIGHTS


def load_prompts(path: str | Path, clip: torch.nn.Module, tokenizer) -> DualPromptCLIP:
    """Rebuild a learner from a folder (or its prompts.safetensors) written by :func:`save_prompts`.

    A missing file is ``FileNotFoundError``, a damaged one (cut short, edited by hand, written for another model)
    ``ValueError``; both name the file."""
    from vision.io import error_line
    from vision.weights_io import read_safetensors

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    wfile, cfile = folder / PROMPTS_WEIGHTS, folder / PROMPTS_CONFIG
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"prompt file '{f}' not found (written by `negvision retrieval train`)")
    cfg = read_prompt_config(cfile)
    sd = read_safetensors(wfile)  # CheckpointCorruptError (a ValueError) naming a truncated or altered file
    if "ctx" not in sd or sd["ctx"].dim() != 3:
        raise ValueError(f"{wfile}: not a prompts file of `negvision retrieval train` (no [sets, n_ctx, width] 'ctx')")
    try:
        model = DualPromptCLIP(clip, tokenizer, n_ctx=int(sd["ctx"].shape[1]), ctx_init=None,
                               class_specific=cfg["class_specific"], categories=cfg["categories"],
                               n_vis=cfg["n_vis"], vis_depth=cfg["vis_depth"] or 1)
        model.ctx_init = cfg.get("ctx_init")
        model.enabled = bool(cfg.get("enabled", True))  # False: the frozen model won on validation
        model.set_attributes(cfg.get("attr_vocab", []), sd.get("attr_weights"))
        missing = model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError, TypeError) as e:  # shapes of another model / context length
        raise ValueError(f"{wfile}: these prompts do not fit the given CLIP model ({error_line(e, 300)})") from None
    if missing.missing_keys:
        raise ValueError(f"{wfile}: missing prompt tensors {missing.missing_keys}")
    return model


def read_prompt_config(path: str | Path) -> dict[str, Any]:
    """prompts.json of a prompts folder; ValueError naming the file when it is not valid or lacks a key."""
    from vision.io import read_json

    p = Path(path)
    cfg = read_json(p, "not valid JSON (rewrite it with `negvision retrieval train`)")
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: must hold a JSON object")
    for key in ("class_specific", "categories", "n_vis", "vis_depth"):
        if key not in cfg:
            raise ValueError(f"{p}: lacks '{key}' (written by `negvision retrieval train`)")
    return cfg


HOLDOUT_SEED = 0xDCA2  # the held-out validation pairs do not change with --seed


def holdout_pairs(pairs: Sequence[Pair], share: float) -> tuple[list[Pair], list[Pair]]:
    """(train, validation): a fixed random ``share`` of the pairs held out, images kept whole (every caption of an
    image goes to the same side). Fewer than 10 images, or ``share`` 0: nothing held out."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the validation share must be in [0, 1), got {share}")
    images = sorted({p.image for p in pairs})
    k = round(share * len(images))
    if share == 0.0 or len(images) < 10 or k == 0:
        return list(pairs), []
    held = set(random.Random(HOLDOUT_SEED).sample(images, k))
    return [p for p in pairs if p.image not in held], [p for p in pairs if p.image in held]


def train_retrieval(clip: torch.nn.Module, tokenizer, preprocess, train_pairs: Sequence[Pair],
                    val_pairs: Sequence[Pair] | None = None, config: DCARConfig | None = None,
                    train: TrainConfig | None = None, run: RunOptions | None = None, *,
                    skipped: dict[str, Sequence[str]] | None = None,
                    extra_config: dict | None = None) -> tuple[DualPromptCLIP, dict]:
    """Train the prompts with ``vision.engine.Trainer``; writes the engine's logs and prompts.* to the run folder.

    Args:
        clip, tokenizer, preprocess: the frozen open_clip model, its tokenizer and image transform.
        train_pairs: the training pairs; val_pairs: held-out pairs (None: ``config.val_split`` of ``train_pairs``).
        config: the method settings (:class:`DCARConfig`; None: its defaults).
        train: the optimisation settings; its unset task-defaulted fields take :data:`TRAIN_DEFAULTS` (epochs 10,
            AdamW, lr 2e-3, weight decay 0, cosine schedule, batch 32); None: ``TrainConfig()``.
            The task sets ``log_every`` (5) and the evaluation cadence (every epoch and before training when there
            are validation pairs, else never); ``out_dir``, ``device``, ``progress``, ``keep_last`` and
            ``num_workers`` come from ``run``.
        run: where and how the run runs (:class:`vision.engine.RunOptions`; None: its defaults).
        skipped: split -> messages of the bad items left out, written to the run's ``skipped.txt``.
        extra_config: more keys for the engine's config.json and prompts.json (e.g. the model name).

    The run folder follows ``vision.engine.run``: ``run.out``, or that name with 2, 3, ... appended when it already
    holds a run, unless ``run.resume`` (True: continue its newest checkpoint; a path: that checkpoint folder) or ``run.exist_ok``
    (reuse it, removing the earlier logs and checkpoints); ``summary["out"]`` is the folder used. ``run.config``
    (the command's options) is written to its ``config.yaml``.

    Validation: ``val_pairs``, else a ``config.val_split`` share of the training pairs (:func:`holdout_pairs`, the
    same pairs for every seed; 0 = none). The frozen model is evaluated on it before training (epoch 0) and after
    every epoch; the prompts of the best epoch are kept, and when no epoch beats the frozen model the saved prompts
    are switched off (``enabled: false``: they give the frozen model's features), so prompt learning never ends
    below zero-shot on the validation pairs. ``summary["selected"]`` says which won.
    """
    from vision.engine import RunOptions, TrainConfig, Trainer, load_model_weights
    from vision.engine.checkpoint import MODEL_FILE
    from vision.engine.run import prepare_run_dir, record_skipped, write_run_config

    from .evaluate import evaluate_retrieval

    cfg = config or DCARConfig()
    run = run or RunOptions()
    train = train if train is not None else TrainConfig()
    seed = train.seed
    if not val_pairs:
        train_pairs, val_pairs = holdout_pairs(train_pairs, cfg.val_split)
    ckpts = Path(run.out) / "checkpoints"
    if run.resume is True and not ckpts.is_dir():
        raise FileNotFoundError(f"cannot resume {run.out}: it holds no checkpoints ({ckpts}); start without --resume")
    out_dir = prepare_run_dir(run.out, resume=run.resume, exist_ok=run.exist_ok)
    if run.config is not None:
        write_run_config(out_dir, {**run.config, "_resumed": bool(run.resume)})
    if skipped and any(skipped.values()):
        record_skipped(out_dir, {k: list(v) for k, v in skipped.items() if v})
    torch.manual_seed(seed)
    categories = categories_of(train_pairs)
    model = build_learner(clip, tokenizer, cfg, categories)
    dataset = PairDataset(train_pairs, preprocess)
    callbacks = []
    if cfg.method == "dcar":
        vocab = attribute_vocab(train_pairs)
        model.set_attributes(vocab)
        if vocab and cfg.lambda_attr > 0:
            callbacks.append(AttributeReweighting(dataset, cfg, seed))
    cat_sim = category_similarity(category_text_features(model, categories)) if categories else None
    loss_fn = RetrievalLoss(cfg, categories, cat_sim, seed)
    val_ds = PairDataset(val_pairs, preprocess) if val_pairs else None

    def eval_fn(m: DualPromptCLIP, ctx: Any) -> dict[str, float]:
        assert val_ds is not None
        if ctx.step == 0:  # before training: the frozen model (zero-shot) is the score to beat
            with m.disabled():
                return evaluate_retrieval(m, val_ds)
        return evaluate_retrieval(m, val_ds)

    tcfg = replace(train.resolved(**TRAIN_DEFAULTS), **run.train_fields(out_dir), log_every=5,
                   eval_every=1 if val_ds is not None else 0, eval_at_start=val_ds is not None)
    extra = {"dcar": asdict(cfg), **(extra_config or {})}
    train_data: Any = dataset
    if cfg.method == "dcar" and cfg.hard_share > 0:
        from torch.utils.data import DataLoader

        from .data import HardNegativeBatchSampler

        train_data = DataLoader(dataset, batch_sampler=HardNegativeBatchSampler(
            train_pairs, tcfg.batch_size, cfg.hard_share, cfg.hard_group, seed), collate_fn=collate_pairs,
            num_workers=tcfg.num_workers)
    trainer = Trainer(model, train_data, tcfg, loss_fn=loss_fn, eval_fn=eval_fn if val_ds is not None else None,
                      metric="mean_recall" if val_ds is not None else None, collate_fn=collate_pairs,
                      batch_size_fn=lambda b: len(b["captions"]), extra_config=extra, callbacks=callbacks)
    summary = trainer.fit(resume=run.resume)
    model = trainer.unwrapped_model
    best = Path(out_dir) / "checkpoints" / "best"
    if val_ds is not None and (best / MODEL_FILE).is_file():  # the prompts of the best validation epoch
        load_model_weights(model, best, strict=False)  # the engine's loader: verified against its sha256
        if summary.get("best_step") == 0:
            model.enabled = False
            summary["selected"] = "frozen model: no epoch beat zero-shot on the validation pairs"
        else:
            summary["selected"] = "best validation mean recall"
    hist = callbacks[0].history if callbacks else []
    save_prompts(model, out_dir, {"method": cfg.method, **(extra_config or {}),
                                  "attr_history": hist[-1:] if hist else []})
    summary["attr_history"] = hist
    summary["out"] = str(out_dir)
    return model, summary
