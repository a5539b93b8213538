"""Negative-label lexicon: the shipped WordNet 3.0 word list and NegLabel's negative mining (Jiang et al., 2024)."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent / "data"
WORDNET_FILE = DATA_DIR / "wordnet_words.txt.gz"
# lexicographer files NegLabel's public code leaves out by default (people, quantities, groups, pertainyms)
DEFAULT_EXCLUDE: tuple[str, ...] = ("noun.person", "noun.quantity", "noun.group", "adj.pert")
NOUN_TEMPLATE = "The nice {}."
ADJ_TEMPLATE = "This is a {} photo."
ID_TEMPLATE = NOUN_TEMPLATE  # NegLabel's ID prompt
PHOTO_TEMPLATE = "a photo of a {}."  # CLIP's / MCM's usual ID prompt


def check_template(template: str) -> str:
    """A prompt template has exactly one ``{}`` (the label) and no other braces; ``ValueError`` otherwise."""
    rest = template.replace("{}", "", 1) if isinstance(template, str) else "{"
    if not isinstance(template, str) or "{}" not in template or "{" in rest or "}" in rest:
        raise ValueError(f"prompt template {template!r} must hold exactly one '{{}}' where the label goes "
                         "(e.g. 'a photo of a {}.')")
    return template


@dataclass
class Lexicon:
    """Candidate words split into nouns and adjectives (each list deduplicated, order kept)."""

    nouns: list[str] = field(default_factory=list)
    adjectives: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nouns) + len(self.adjectives)


def load_wordnet(exclude: Iterable[str] = DEFAULT_EXCLUDE, path: str | Path = WORDNET_FILE) -> Lexicon:
    """WordNet 3.0 nouns and adjectives from the shipped list, minus the ``exclude`` lexicographer files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list {path} is missing; rebuild it with `python -m clip_ood.tools.build_wordnet_list`")
    excl = set(exclude)
    nouns: dict[str, None] = {}
    adjs: dict[str, None] = {}
    section = ""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                section = line[1:]
                continue
            if not line or section in excl:
                continue
            (nouns if section.startswith("noun.") else adjs)[line] = None
    # a word that is both a noun and an adjective is kept as a noun (NegLabel dedups across files)
    return Lexicon(list(nouns), [a for a in adjs if a not in nouns])


def read_words(path: str | Path) -> Lexicon:
    """A user word list: one word a line, optionally ``noun<TAB>word`` / ``adj<TAB>word`` (default noun)."""
    nouns: dict[str, None] = {}
    adjs: dict[str, None] = {}
    for pos, word in _read_tagged(path):
        (adjs if pos == "adj" else nouns)[word] = None
    return Lexicon(list(nouns), [a for a in adjs if a not in nouns])


def _lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped); FileNotFoundError / ValueError naming the file."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: {what} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read the {what} ({e.strerror or e})") from None


def _read_tagged(path: str | Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for lineno, line in enumerate(_lines(path, "word list"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            pos, word = line.split("\t", 1)
            if pos not in ("noun", "adj"):
                raise ValueError(f"{path}:{lineno}: part of speech must be 'noun' or 'adj', got {pos!r}")
        else:
            pos, word = "noun", line
        out.append((pos, word.strip()))
    return out


def read_labels(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines and '#' comments skipped); error names the file if empty/duplicated."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path, "label file"), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in seen:
            raise ValueError(f"{path}:{lineno}: class {name!r} already given on line {seen[name]}")
        seen[name] = lineno
        labels.append(name)
    if not labels:
        raise ValueError(f"{path}: no class names found")
    return labels


def select_negative_labels(
    candidate_features: Tensor,
    id_features: Tensor,
    num_negatives: int,
    percentile: float = 0.95,
    chunk_size: int = 4096,
) -> Tensor:
    """Indices (LongTensor, ascending s_m) of the ``num_negatives`` candidates farthest from the ID classes.

    s_m = torch.quantile(cos(candidate_m, id_c) over c, percentile) with linear interpolation.

    Args:
        candidate_features: [M, D] text features of the candidate words (normalised here).
        id_features: [C, D] text features of the ID classes (normalised here).
        num_negatives: how many to select (clipped to 0..M).
        percentile: eta, the quantile of the similarities to the C ID classes (default 0.95).
        chunk_size: candidates per quantile call (default 4096; torch.quantile refuses very large inputs).

    Returns:
        LongTensor [min(num_negatives, M)] of candidate indices, ascending s_m (farthest first).
    """
    import torch
    import torch.nn.functional as F

    cand = F.normalize(candidate_features.float(), dim=-1)
    ids = F.normalize(id_features.float(), dim=-1)
    s = []
    for i in range(0, cand.shape[0], chunk_size):  # torch.quantile refuses very large inputs
        sim = cand[i : i + chunk_size] @ ids.T  # [m, C]
        s.append(torch.quantile(sim, percentile, dim=-1, interpolation="linear"))  # eta-percentile over ID classes
    s_m = torch.cat(s) if s else torch.zeros(0)
    num = max(0, min(num_negatives, s_m.shape[0]))
    return torch.argsort(s_m, stable=True)[:num]


@dataclass
class NegativeLabels:
    """Mined negatives: the words, their part of speech and the prompts encoded for them."""

    words: list[str]
    pos: list[str]

    @property
    def prompts(self) -> list[str]:
        return [label_prompt(w, p) for w, p in zip(self.words, self.pos, strict=False)]

    def __len__(self) -> int:
        return len(self.words)

    def save(self, path: str | Path) -> None:
        """Write ``pos<TAB>word`` lines (atomic)."""
        from vision.io import write_text_atomic

        write_text_atomic(path, "".join(f"{p}\t{w}\n" for w, p in zip(self.words, self.pos, strict=False)))

    @classmethod
    def load(cls, path: str | Path) -> NegativeLabels:
        pairs = _read_tagged(path)
        return cls([w for _, w in pairs], [p for p, _ in pairs])


def label_prompt(word: str, pos: str) -> str:
    """The prompt a negative label is encoded with: nouns 'The nice {}.', adjectives 'This is a {} photo.'."""
    return (ADJ_TEMPLATE if pos == "adj" else NOUN_TEMPLATE).format(word)


def split_counts(num_negatives: int, num_nouns: int, num_adjs: int) -> tuple[int, int]:
    """Negatives per pool, in proportion to the pool sizes: (round(n * nouns / total), rest)."""
    total = num_nouns + num_adjs
    if total == 0:
        return 0, 0
    num_negatives = min(num_negatives, total)
    n_noun = min(num_nouns, round(num_negatives * num_nouns / total))
    n_adj = min(num_adjs, num_negatives - n_noun)
    return n_noun, n_adj


def mine_negative_labels(
    encoder,
    id_labels: Sequence[str],
    num_negatives: int = 10_000,
    percentile: float = 0.95,
    lexicon: Lexicon | None = None,
    id_templates: Sequence[str] = (ID_TEMPLATE,),
    cache_dir: str | Path | None = None,
    progress: bool = True,
    neg_templates: Sequence[str] | None = None,
) -> NegativeLabels:
    """NegLabel mining: per pool (nouns, adjectives) keep the candidates farthest from the ID classes
    (candidates encoded with ``neg_templates`` when given, else the noun / adjective templates)."""
    from clip_ood.encoders import encode_labels

    lexicon = lexicon if lexicon is not None else load_wordnet()
    id_set = {c.strip().lower() for c in id_labels}
    nouns = [w for w in lexicon.nouns if w.lower() not in id_set]
    adjs = [w for w in lexicon.adjectives if w.lower() not in id_set]
    id_feats = encode_labels(encoder, id_labels, id_templates, cache_dir=cache_dir, progress=progress)
    n_noun, n_adj = split_counts(num_negatives, len(nouns), len(adjs))
    words: list[str] = []
    pos: list[str] = []
    for pool, tag, n, tmpl in ((nouns, "noun", n_noun, NOUN_TEMPLATE), (adjs, "adj", n_adj, ADJ_TEMPLATE)):
        if n == 0 or not pool:
            continue
        feats = encode_labels(encoder, pool, tuple(neg_templates) if neg_templates else (tmpl,), cache_dir=cache_dir,
                              progress=progress)
        idx = select_negative_labels(feats, id_feats, n, percentile)
        words += [pool[i] for i in idx.tolist()]
        pos += [tag] * len(idx)
    return NegativeLabels(words, pos)
