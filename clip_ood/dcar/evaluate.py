"""Image-text retrieval metrics: image->text and text->image R@1/5/10 and mean recall.

Ground truth: image i matches every caption whose string equals its own caption (identical captions of
different images are interchangeable, so a generated set with repeated captions is not penalised); the
texts are the distinct captions of the set. Text->image: a caption matches every image it describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

KS = (1, 5, 10)


def recall_at_k(sim: Tensor, positives: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K both ways for a similarity [N_img, N_txt] and a bool ground truth of the same shape (in %)."""
    out: dict[str, float] = {}
    for name, s, gt in (("i2t", sim, positives), ("t2i", sim.T, positives.T)):
        order = s.argsort(dim=1, descending=True)
        hits = gt.gather(1, order)  # [N, M] bool, ranked
        first = torch.where(hits.any(1), hits.float().argmax(1), torch.full((s.shape[0],), s.shape[1]))
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * float((first < k).float().mean())
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def ground_truth(captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """(distinct captions, bool [N_img, N_txt]) for images with the given captions."""
    texts: list[str] = []
    index: dict[str, int] = {}
    for c in captions:
        if c not in index:
            index[c] = len(texts)
            texts.append(c)
    gt = torch.zeros(len(captions), len(texts), dtype=torch.bool)
    for i, c in enumerate(captions):
        gt[i, index[c]] = True
    return texts, gt


@torch.no_grad()
def encode_dataset(model, dataset, batch_size: int = 64) -> tuple[Tensor, list[str], Tensor, list]:
    """(normalised image features [N, D], distinct texts, normalised text features [T, D], text categories)."""
    from .data import collate_pairs

    feats = []
    for i in range(0, len(dataset), batch_size):
        b = collate_pairs([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        feats.append(model.encode_image(b["images"].to(_device(model)), normalize=True).float().cpu())
    img = torch.cat(feats)
    texts, _ = ground_truth([p.caption for p in dataset.pairs])
    cat_of = {p.caption: p.category for p in dataset.pairs}
    cats = [cat_of[t] for t in texts]
    tf = []
    for i in range(0, len(texts), batch_size):
        c = cats[i : i + batch_size] if getattr(model, "class_specific", False) else None
        tf.append(model.encode_text(texts[i : i + batch_size], c, normalize=True).float().cpu())
    return img, texts, torch.cat(tf), cats


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def retrieval_similarity(model, dataset, batch_size: int = 64) -> tuple[Tensor, list[str], Tensor]:
    """(cosine similarity [N_img, N_txt], distinct texts, bool ground truth [N_img, N_txt]) of a model (eval
    mode while encoding) on a :class:`~clip_ood.dcar.data.PairDataset`."""
    was = model.training
    model.eval()
    try:
        img, texts, txt, _ = encode_dataset(model, dataset, batch_size)
    finally:
        model.train(was)
    _, gt = ground_truth([p.caption for p in dataset.pairs])
    return img @ txt.T, texts, gt


@torch.no_grad()
def evaluate_retrieval(model, dataset, batch_size: int = 64, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K (in %) of a :class:`~clip_ood.dcar.prompts.DualPromptCLIP` (or its ``disabled()`` baseline) on a
    :class:`~clip_ood.dcar.data.PairDataset`."""
    sim, _, gt = retrieval_similarity(model, dataset, batch_size)
    return recall_at_k(sim, gt, ks)


def format_table(results: dict[str, dict[str, float]], ks: Sequence[int] = KS) -> str:
    """Plain-text table: one row per (name, direction), columns R@K and mean recall."""
    head = f"{'model':<14}{'direction':<12}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'mR':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
            row = f"{name:<14}{label:<12}" + "".join(f"{r[f'{d}_R@{k}']:>8.1f}" for k in ks)
            lines.append(row + f"{r['mean_recall']:>8.1f}")
    return "\n".join(lines)
