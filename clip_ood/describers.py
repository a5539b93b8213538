"""Describers / reasoners for ANTS: describe likely-OOD images and name visually similar classes.

One interface (``describe``, ``similar_labels``) with three kinds of implementation:
- ``TransformersDescriber``: a transformers MLLM (Qwen2-VL-2B-Instruct by default, LLaVA-1.5) or a BLIP captioner,
  from a hub name or a local folder, loaded lazily on first use;
- ``LexiconDescriber``: the offline fallback, no MLLM: the encoder's nearest lexicon words to an image (and to a
  class name). Lower quality than an MLLM: it can only recombine words the lexicon has, and its "similar classes"
  are CLIP-text neighbours, not visual reasoning;
- ``ScriptedDescriber``: fixed answers, for tests and dry runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from vision.registry import Registry

DESCRIBE_PROMPT = "Describe the main object in this image in one short sentence."
SIMILAR_PROMPT = ("List {k} names of object classes that look visually similar to a {name} but are not a {name}. "
                  "Answer with a comma-separated list of names only.")


@runtime_checkable
class Describer(Protocol):
    """``describe(images, features)`` -> one sentence per image; ``similar_labels(name, k)`` -> up to k names."""

    def describe(self, images: Sequence[Any] | None, features: Any = None) -> list[str]: ...

    def similar_labels(self, class_name: str, k: int = 5) -> list[str]: ...


DESCRIBERS: Registry[Describer] = Registry("describer")


def create_describer(name: str, **kwargs: Any) -> Describer:
    """Build a registered describer: 'lexicon', 'scripted', 'qwen2-vl', 'llava', 'blip'."""
    return DESCRIBERS.create(name, **kwargs)


def parse_label_list(text: str, k: int) -> list[str]:
    """Split an LLM answer ('1. fox, 2. wolf\\n- coyote') into up to k clean names."""
    parts = re.split(r"[,\n;]+", text)
    out: list[str] = []
    for p in parts:
        p = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", p).strip().strip(".\"'").strip()
        if p and len(p) <= 60 and p.lower() not in (o.lower() for o in out):
            out.append(p)
    return out[:k]


class ScriptedDescriber:
    """Returns scripted sentences (cycled) and a fixed class -> similar-names table."""

    needs_images = False  # the sentences do not depend on the images

    def __init__(self, sentences: Iterable[str] = ("a photo of something else",),
                 similar: dict[str, list[str]] | None = None) -> None:
        self._sentences = itertools.cycle(list(sentences))
        self.similar = similar or {}
        self.describe_calls = 0
        self.similar_calls: list[str] = []

    def describe(self, images: Sequence[Any] | None, features: Any = None) -> list[str]:
        n = len(images) if images is not None else int(features.shape[0])
        self.describe_calls += 1
        return [next(self._sentences) for _ in range(n)]

    def similar_labels(self, class_name: str, k: int = 5) -> list[str]:
        self.similar_calls.append(class_name)
        return list(self.similar.get(class_name, []))[:k]


class LexiconDescriber:
    """Offline fallback: nearest lexicon words to the image feature (describe) or to the class name (similar).

    ``words`` default to the shipped WordNet nouns; their features are encoded once (cached on disk).
    """

    needs_images = False  # describes the image features, not the pixels

    def __init__(self, encoder: Any, words: Sequence[str] | None = None, k: int = 3,
                 template: str = "The nice {}.", cache_dir: Any = None) -> None:
        self.encoder = encoder
        self._words = list(words) if words is not None else None
        self.k = k
        self.template = template
        self.cache_dir = cache_dir
        self._feats = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            from clip_ood.lexicon import load_wordnet

            self._words = load_wordnet().nouns
        return self._words

    def _features(self):
        if self._feats is None:
            from clip_ood.encoders import encode_labels

            self._feats = encode_labels(self.encoder, self.words, (self.template,), cache_dir=self.cache_dir)
        return self._feats

    def describe(self, images: Sequence[Any] | None, features: Any = None) -> list[str]:
        import torch.nn.functional as F

        if features is None:
            from clip_ood.encoders import encode_pil

            features = encode_pil(self.encoder, images)
        sims = F.normalize(features.float().cpu(), dim=-1) @ self._features().T
        idx = sims.topk(min(self.k, len(self.words)), dim=-1).indices.tolist()
        return ["a photo of " + ", ".join(self.words[j] for j in row) for row in idx]

    def similar_labels(self, class_name: str, k: int = 5) -> list[str]:
        import torch.nn.functional as F

        q = F.normalize(self.encoder.encode_text([self.template.format(class_name)]).float().cpu(), dim=-1)
        order = (q @ self._features().T)[0].argsort(descending=True).tolist()
        out = [self.words[j] for j in order if self.words[j].lower() != class_name.lower()]
        return out[:k]


class TransformersDescriber:
    """A transformers MLLM (kind 'qwen2-vl' / 'llava': chat + generate) or BLIP captioner (kind 'blip').

    ``model`` is a hub name or a local folder; nothing is loaded until the first call. BLIP cannot reason about
    similar classes: ``similar_labels`` then asks ``fallback`` (e.g. a LexiconDescriber) or returns [].
    """

    needs_images = True  # the MLLM looks at the images

    DEFAULTS = {"qwen2-vl": "Qwen/Qwen2-VL-2B-Instruct", "llava": "llava-hf/llava-1.5-7b-hf",
                "blip": "Salesforce/blip-image-captioning-base"}

    def __init__(self, kind: str = "qwen2-vl", model: str | None = None, device: str | None = None,
                 max_new_tokens: int = 48, dtype: str = "auto", fallback: Describer | None = None) -> None:
        if kind not in self.DEFAULTS:
            raise ValueError(f"unknown describer kind {kind!r}; choose one of {', '.join(self.DEFAULTS)}")
        self.kind = kind
        self.model_name = model or self.DEFAULTS[kind]
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.fallback = fallback
        self._model = None
        self._processor = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers

        from vision.device import pick_device

        dev = pick_device(self.device)
        try:
            self._processor = transformers.AutoProcessor.from_pretrained(self.model_name)
            if self.kind == "blip":
                cls = transformers.BlipForConditionalGeneration
            else:
                cls = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
            self._model = cls.from_pretrained(self.model_name, dtype=self.dtype).to(dev).eval()
            tok = getattr(self._processor, "tokenizer", None)
            if self.kind != "blip" and tok is not None:
                tok.padding_side = "left"  # decoder-only generation of a batch of different-length prompts
        except OSError as e:
            raise FileNotFoundError(
                f"describer model '{self.model_name}' not found locally and could not be downloaded ({e}). "
                "Download it once with network access (or pass a local folder); see weights/README.md. "
                "Offline alternative: --describer lexicon.") from e

    def _generate(self, prompts: list[str], images: list[Any] | None) -> list[str]:
        import torch

        self._load()
        proc, model = self._processor, self._model
        if self.kind == "blip":
            inputs = proc(images=[im.convert("RGB") for im in images], return_tensors="pt").to(model.device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            return [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]
        texts = []
        for p in prompts:
            content = ([{"type": "image"}] if images is not None else []) + [{"type": "text", "text": p}]
            texts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        kw: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images is not None:
            kw["images"] = [im.convert("RGB") for im in images]
        inputs = proc(**kw).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in proc.batch_decode(new, skip_special_tokens=True)]

    def describe(self, images: Sequence[Any] | None, features: Any = None) -> list[str]:
        if images is None:
            if self.fallback is not None:
                return self.fallback.describe(None, features)
            raise ValueError("TransformersDescriber.describe needs the images (got features only)")
        return self._generate([DESCRIBE_PROMPT] * len(images), list(images))

    def similar_labels(self, class_name: str, k: int = 5) -> list[str]:
        if self.kind == "blip":
            return self.fallback.similar_labels(class_name, k) if self.fallback is not None else []
        answer = self._generate([SIMILAR_PROMPT.format(k=k, name=class_name)], None)[0]
        return [n for n in parse_label_list(answer, k + 1) if n.lower() != class_name.lower()][:k]


DESCRIBERS.add("scripted", ScriptedDescriber)
DESCRIBERS.add("lexicon", LexiconDescriber)
for _kind in TransformersDescriber.DEFAULTS:
    DESCRIBERS.add(_kind, lambda _k=_kind, **kw: TransformersDescriber(kind=_k, **kw))
