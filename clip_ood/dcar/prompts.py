"""Dual prompt learner on a frozen open_clip model: text context vectors (CoOp) + visual prompt tokens (VPT).

Works with open_clip's OpenAI-style ``CLIP`` and with ``CustomTextCLIP`` (built-in ``TextTransformer`` tower);
HF text towers and CoCa (``cls_emb``) text towers are rejected with a clear error. Visual prompts need a
``VisionTransformer`` image tower; with ``n_vis=0`` any image tower works (it is called unchanged).

Text side (CoOp for retrieval): the caption is tokenised with ``context_length - n_ctx`` and the learnable
context vectors are put right after [SOS]:  ``[SOS] V_1 .. V_n  caption-tokens [EOT] pad``.  The pooled token
(argmax / eos) is shifted by ``n_ctx``. Context is shared, or class-specific (one set per category; the text's
category picks it).  Visual side (VPT / MaPLe style): ``n_vis`` tokens are appended after the patch tokens
(after ``ln_pre``); "deep" prompts replace them at the input of each of the first ``vis_depth`` blocks, after
which they are carried along; they are removed before pooling. With ``enabled=False`` (or ``n_ctx=0``,
``n_vis=0``) the same code path reproduces the frozen model's features bit for bit.

The frozen CLIP is held outside the module tree (``self.clip`` is not a registered submodule) so that
``parameters()`` / ``state_dict()`` hold only the prompts: optimizer and checkpoints see just them;
``.to()`` / ``.half()`` are forwarded to the CLIP through ``_apply``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _TextParts:
    """The pieces of an open_clip text tower, whichever model class holds them."""

    def __init__(self, model: nn.Module):
        tower = getattr(model, "text", None)
        if tower is None:  # OpenAI-style CLIP: parts on the model
            self.owner = model
            self.pool_type = getattr(model, "text_pool_type", "argmax")
            self.eos_id = getattr(model, "text_eos_id", None)
            self.cls_emb = None
            self.use_pad_mask = False
        else:
            if not hasattr(tower, "token_embedding"):
                raise NotImplementedError(
                    f"text prompts need open_clip's built-in TextTransformer; got {type(tower).__name__} "
                    "(HF text towers are not supported)")
            self.owner = tower
            self.pool_type = tower.pool_type
            self.eos_id = getattr(tower, "eos_id", None)
            self.cls_emb = getattr(tower, "cls_emb", None)
            self.use_pad_mask = bool(getattr(tower, "use_pad_mask", False))
        if self.cls_emb is not None or self.use_pad_mask:
            raise NotImplementedError("text prompts do not support CoCa-style cls_emb / padding-mask text towers")
        o = self.owner
        self.token_embedding = o.token_embedding
        self.positional_embedding = o.positional_embedding
        self.transformer = o.transformer
        self.ln_final = o.ln_final
        self.text_projection = o.text_projection
        self.attn_mask = o.attn_mask
        self.context_length = int(o.positional_embedding.shape[0])
        self.width = int(o.token_embedding.weight.shape[1])


def _run_blocks(transformer: nn.Module, x: Tensor, attn_mask: Tensor | None,
                deep: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
    """Run open_clip ``Transformer`` blocks like its forward; ``deep(i, x)`` may rewrite the input of block i."""
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for i, r in enumerate(transformer.resblocks):
        if deep is not None:
            x = deep(i, x if transformer.batch_first else x.transpose(0, 1))
            x = x if transformer.batch_first else x.transpose(0, 1)
        x = r(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


class DualPromptCLIP(nn.Module):
    """Frozen open_clip model + learnable text context (``n_ctx``) and visual prompts (``n_vis`` x ``vis_depth``).

    ``encode_text(texts, categories)`` / ``encode_image(images)`` return unnormalised features like open_clip.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, *, n_ctx: int = 4, ctx_init: str | None = None,
                 class_specific: bool = False, categories: Sequence[str] | None = None, n_vis: int = 0,
                 vis_depth: int = 1, init_std: float = 0.02):
        """Freeze ``clip`` and create the prompts.

        Args:
            clip: an open_clip ``CLIP`` / ``CustomTextCLIP`` (frozen here; not a registered submodule).
            tokenizer: its open_clip tokenizer (texts -> LongTensor [T, context_length]).
            n_ctx: learnable text context vectors M (default 4; 0 = none; replaced by ctx_init's token count).
            ctx_init: words initialising the context, e.g. "a photo of a" (default None: N(0, init_std)).
            class_specific: one context set per category instead of one shared set (default False).
            categories: the category names (needed with class_specific; a text's category picks its set).
            n_vis: visual prompt tokens M_v appended after the patch tokens (default 0 = none).
            vis_depth: image-tower blocks that get fresh (deep) visual prompts, 1..layers (default 1 = shallow).
            init_std: std of the normal init of the prompts (default 0.02).
        """
        super().__init__()
        object.__setattr__(self, "clip", clip)  # not a submodule: see the module docstring
        for p in clip.parameters():
            p.requires_grad_(False)
        clip.eval()
        self.tokenizer = tokenizer
        self.text_parts = _TextParts(clip)
        self.categories = list(categories or [])
        self._cat_index = {c: i for i, c in enumerate(self.categories)}
        self.class_specific = bool(class_specific)
        if self.class_specific and not self.categories:
            raise ValueError("class-specific context needs the list of categories")
        self.enabled = True
        self.ctx_init = ctx_init
        width = self.text_parts.width
        dtype = self.text_parts.token_embedding.weight.dtype
        init_vectors = None
        if ctx_init:
            toks = self._tokenize([ctx_init], self.text_parts.context_length)
            n_words = int(self._eot_index(toks)[0]) - 1  # tokens between SOS and EOT
            n_ctx = n_words
            with torch.no_grad():
                init_vectors = self.text_parts.token_embedding(toks.to(self._device))[0, 1 : 1 + n_ctx].float().cpu()
        if n_ctx < 0 or n_ctx >= self.text_parts.context_length - 2:
            raise ValueError(f"n_ctx={n_ctx} does not fit the context length {self.text_parts.context_length}")
        self.n_ctx = int(n_ctx)
        n_sets = len(self.categories) if self.class_specific else 1
        ctx = torch.empty(n_sets, self.n_ctx, width)
        if init_vectors is not None:
            ctx[:] = init_vectors  # CoOp: every set starts from the embedding of "a photo of a"
        else:
            nn.init.normal_(ctx, std=init_std)
        self.ctx = nn.Parameter(ctx.to(dtype))  # [n_sets, n_ctx, width]

        # visual prompts (VPT): [vis_depth, n_vis, width]
        self.n_vis = int(n_vis)
        self.vis_depth = int(vis_depth) if n_vis > 0 else 0
        visual = clip.visual
        if self.n_vis > 0:
            if not all(hasattr(visual, a) for a in ("_embeds", "_pool", "transformer", "proj")):
                raise NotImplementedError(
                    f"visual prompts need open_clip's VisionTransformer; got {type(visual).__name__}")
            n_layers = len(visual.transformer.resblocks)
            if not 1 <= self.vis_depth <= n_layers:
                raise ValueError(f"vis_depth must be in 1..{n_layers} (layers of the image tower), got {vis_depth}")
            vwidth = int(visual.class_embedding.shape[-1])
            vp = torch.empty(self.vis_depth, self.n_vis, vwidth)
            nn.init.normal_(vp, std=init_std)
            self.vis_prompts = nn.Parameter(vp.to(visual.class_embedding.dtype))
        else:
            self.register_parameter("vis_prompts", None)
        # attribute weights (see attributes.py) live here so that they are checkpointed with the prompts
        self.register_buffer("attr_weights", torch.zeros(0))
        self.attr_vocab: list[str] = []

    # ------------------------------------------------------------------ module plumbing

    def _apply(self, fn, recurse: bool = True):  # .to() / .float() also reach the frozen CLIP
        super()._apply(fn, recurse)
        self.clip._apply(fn)
        return self

    def train(self, mode: bool = True) -> DualPromptCLIP:
        super().train(mode)
        self.clip.eval()  # frozen: no dropout / patch dropout / BN updates
        return self

    @property
    def _device(self) -> torch.device:
        return self.text_parts.token_embedding.weight.device

    @property
    def logit_scale(self) -> Tensor:
        """The frozen CLIP's (log) logit scale."""
        return self.clip.logit_scale

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the encoders behave as the frozen model (zero-shot baseline)."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old

    def set_attributes(self, vocab: Sequence[str], weights: Tensor | None = None) -> None:
        """Attach the attribute vocabulary and its weights (uniform if none)."""
        self.attr_vocab = list(vocab)
        w = torch.ones(len(vocab)) if weights is None else weights.detach().float().cpu()
        self.attr_weights = w.to(self._device)

    def prompt_config(self) -> dict[str, Any]:
        """Plain-JSON description needed to rebuild this learner around the same CLIP."""
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "class_specific": self.class_specific,
                "categories": self.categories, "n_vis": self.n_vis, "vis_depth": self.vis_depth,
                "attr_vocab": self.attr_vocab, "enabled": self.enabled}

    # ------------------------------------------------------------------ text

    def _tokenize(self, texts: Sequence[str], context_length: int) -> Tensor:
        try:
            return self.tokenizer(list(texts), context_length=context_length)
        except TypeError:  # tokenizers without a context_length argument
            toks = self.tokenizer(list(texts))
            return toks[:, :context_length]

    def _eot_index(self, tokens: Tensor) -> Tensor:
        tp = self.text_parts
        if tp.pool_type == "eos" and tp.eos_id is not None:
            return (tokens == tp.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def _active_ctx(self) -> int:
        return self.n_ctx if self.enabled else 0

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids with room left for the context vectors (``context_length - n_ctx``)."""
        return self._tokenize(texts, self.text_parts.context_length - self._active_ctx())

    def category_ids(self, categories: Sequence[str | None]) -> Tensor:
        """Indices of categories in the learner's list; None -> len(categories) (mean context); unknown: KeyError."""
        out = []
        for c in categories:
            if c is None:
                out.append(len(self.categories))  # the mean context
                continue
            if c not in self._cat_index:
                raise KeyError(f"unknown category '{c}' (known: {self.categories[:10]}...)")
            out.append(self._cat_index[c])
        return torch.tensor(out, dtype=torch.long)

    def encode_text(self, texts: Sequence[str] | Tensor, categories: Sequence[str] | None = None,
                    normalize: bool = False) -> Tensor:
        """Features [T, D] of captions (strings, or token ids from :meth:`tokenize`)."""
        tp = self.text_parts
        tokens = self.tokenize(texts) if not isinstance(texts, Tensor) else texts
        tokens = tokens.to(self._device)
        n = self._active_ctx()
        cast = tp.transformer.get_cast_dtype()
        x = tp.token_embedding(tokens).to(cast)  # [T, L - n, W]
        if n > 0:
            if self.class_specific:
                if categories is None:
                    raise ValueError("class-specific context needs the category of each text")
                ids = self.category_ids(categories).to(self._device)
                # a text without category (None: e.g. an attribute description) uses the mean context
                ctx = torch.cat([self.ctx, self.ctx.mean(0, keepdim=True)])[ids]
            else:
                ctx = self.ctx.expand(x.shape[0], -1, -1)
            # CoOp: [SOS] [V]_1..[V]_M caption [EOT]
            x = torch.cat([x[:, :1], ctx.to(cast), x[:, 1:]], dim=1)
        x = x + tp.positional_embedding.to(cast)
        x = _run_blocks(tp.transformer, x, tp.attn_mask)
        x = tp.ln_final(x)
        if tp.pool_type in ("argmax", "eos"):
            idx = self._eot_index(tokens) + n
            x = x[torch.arange(x.shape[0], device=x.device), idx]
        elif tp.pool_type == "first":
            x = x[:, 0]
        elif tp.pool_type == "last":
            x = x[:, -1]
        proj = tp.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ image

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Features [B, D] of preprocessed images."""
        visual = self.clip.visual
        if self.vis_prompts is None:  # no visual prompts: the tower as it is (any architecture)
            feats = self.clip.encode_image(images)
            return F.normalize(feats, dim=-1) if normalize else feats
        x = visual._embeds(images)  # [B, 1 + N, W], after ln_pre
        m = self.n_vis if (self.enabled and self.vis_prompts is not None) else 0
        deep = None
        if m > 0:
            P = self.vis_prompts.to(x.dtype)
            x = torch.cat([x, P[0].expand(x.shape[0], -1, -1)], dim=1)  # VPT: append prompt tokens

            def deep(i: int, h: Tensor) -> Tensor:
                if 0 < i < self.vis_depth:  # VPT-deep: fresh prompts at the input of block i
                    h = torch.cat([h[:, :-m], P[i].expand(h.shape[0], -1, -1)], dim=1)
                return h

        x = _run_blocks(visual.transformer, x, None, deep)
        if m > 0:
            x = x[:, :-m]  # drop prompt tokens before pooling
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: Tensor, texts: Sequence[str], categories: Sequence[str | None] | None = None
                ) -> tuple[Tensor, Tensor]:
        """Normalised (image features, text features); training goes through here (DDP-safe)."""
        return self.encode_image(images, normalize=True), self.encode_text(texts, categories, normalize=True)
