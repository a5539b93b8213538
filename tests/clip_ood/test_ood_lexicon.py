"""Negative-label selection, the shipped WordNet list and mining on a small lexicon."""

import pytest
import torch

from clip_ood.lexicon import (
    Lexicon,
    NegativeLabels,
    label_prompt,
    load_wordnet,
    mine_negative_labels,
    read_labels,
    select_negative_labels,
    split_counts,
)


def test_select_negative_labels_hand_values():
    e1, e2, e3 = torch.eye(3)
    id_f = torch.stack([e1, e2])
    cand = torch.stack([e1, e3, (e1 + e2), -e1])
    # s_m = linear 0.95-quantile of the two cosines = min + 0.95 (max - min)
    # c0: [1, 0] -> 0.95; c1: [0, 0] -> 0; c2: [.707, .707] -> .707; c3: [-1, 0] -> -0.05
    idx = select_negative_labels(cand, id_f, num_negatives=2, percentile=0.95)
    assert idx.dtype == torch.long and idx.tolist() == [3, 1]
    assert select_negative_labels(cand, id_f, 10).tolist() == [3, 1, 2, 0]
    # percentile 0 = min over classes: c0 0, c1 0, c2 .707, c3 -1 -> stable ascending
    assert select_negative_labels(cand, id_f, 4, percentile=0.0).tolist() == [3, 0, 1, 2]


def test_select_negative_labels_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    cand, ids = torch.randn(1000, 8, generator=g), torch.randn(7, 8, generator=g)
    a = select_negative_labels(cand, ids, 100, chunk_size=64)
    b = select_negative_labels(cand, ids, 100, chunk_size=10_000)
    assert torch.equal(a, b)


def test_shipped_wordnet_list():
    lex = load_wordnet()
    assert len(lex.nouns) > 50_000 and len(lex.adjectives) > 10_000
    assert "cat" in lex.nouns and "wooden" in lex.adjectives and "red" in lex.nouns
    assert not set(lex.nouns) & set(lex.adjectives)
    full = load_wordnet(exclude=())
    assert len(full.nouns) > len(lex.nouns)
    assert "carpenter" in full.nouns and "carpenter" not in lex.nouns  # noun.person left out by default
    from clip_ood.lexicon import DATA_DIR

    assert "Princeton" in (DATA_DIR / "LICENSE-WordNet").read_text()


def test_split_counts_and_prompts():
    assert split_counts(10_000, 60_000, 20_000) == (7_500, 2_500)
    assert split_counts(10, 3, 1) == (3, 1)
    assert split_counts(5, 0, 0) == (0, 0)
    assert label_prompt("dog", "noun") == "The nice dog."
    assert label_prompt("red", "adj") == "This is a red photo."


def test_read_labels_errors(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("cat\n\n# comment\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"c.txt:5"):
        read_labels(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="no class names"):
        read_labels(p)


def test_mine_on_small_lexicon(tiny_encoder, tmp_path):
    lex = Lexicon(nouns=[f"thing{i}" for i in range(30)] + ["apple"], adjectives=[f"shade{i}" for i in range(10)])
    neg = mine_negative_labels(tiny_encoder, ["apple", "leaf"], num_negatives=8, lexicon=lex,
                               cache_dir=tmp_path, progress=False)
    assert len(neg) == 8
    assert neg.pos.count("noun") == round(8 * 30 / 40) and neg.pos.count("adj") == 2
    assert "apple" not in neg.words  # ID names are not negatives
    # the nouns picked are the farthest by the 0.95-quantile rule
    from clip_ood.encoders import encode_labels

    id_f = encode_labels(tiny_encoder, ["apple", "leaf"], ("The nice {}.",), cache_dir=False)
    pool = [f"thing{i}" for i in range(30)]
    f = encode_labels(tiny_encoder, pool, ("The nice {}.",), cache_dir=False)
    want = [pool[i] for i in select_negative_labels(f, id_f, 6).tolist()]
    assert neg.words[:6] == want
    out = tmp_path / "neg.txt"
    neg.save(out)
    back = NegativeLabels.load(out)
    assert back.words == neg.words and back.pos == neg.pos
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # ID, noun and adjective features cached
    again = encode_labels(tiny_encoder, ["apple", "leaf"], ("The nice {}.",), cache_dir=tmp_path)
    assert torch.allclose(again, id_f, atol=1e-6)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # a cache hit, nothing new written
