"""DCAR data: FDRD JSON, CSV, JSONL; errors name the line; class-name swaps."""

import json
import random

import pytest
from PIL import Image

from clip_ood.dcar.data import PairDataError, load_pairs, sample_negatives, swap_class_name


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "pets" / "beagle").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "beagle" / name)
    return tmp_path


def test_fdrd_json(folder):
    recs = [{"file_name": "a.png", "file_path": "pets/beagle", "positive": "a beagle with long ears",
             "negative": ["a pug with long ears", "a husky with long ears"]},
            {"file_name": "b.png", "file_path": "pets/beagle/b.png", "positive": "a beagle", "negative": []}]
    (folder / "fdrd.json").write_text(json.dumps(recs))
    pairs = load_pairs(folder / "fdrd.json")
    assert [p.category for p in pairs] == ["beagle", "beagle"]
    assert pairs[0].negatives == ["a pug with long ears", "a husky with long ears"]
    recs[1]["file_name"] = "missing.png"
    recs[1]["file_path"] = "pets/beagle"
    (folder / "fdrd.json").write_text(json.dumps(recs))
    with pytest.raises(PairDataError, match=r"record 2: image file .*missing.png' not found"):
        load_pairs(folder / "fdrd.json")
    with pytest.warns(UserWarning, match="record 2"):
        assert len(load_pairs(folder / "fdrd.json", skip_bad=True)) == 1


def test_csv_and_jsonl_errors_name_the_line(folder):
    csv = folder / "pairs.csv"
    csv.write_text("image,caption,category,attributes\n"
                   "pets/beagle/a.png,a brown beagle,beagle,brown;long ears\n"
                   "pets/beagle/b.png,  ,beagle,\n")
    with pytest.raises(PairDataError, match=r"pairs.csv: line 3: empty caption"):
        load_pairs(csv)
    csv.write_text("image,caption,category,attributes\npets/beagle/a.png,a brown beagle,beagle,brown;long ears\n")
    assert load_pairs(csv)[0].attributes == ["brown", "long ears"]
    with pytest.raises(PairDataError, match=r"line 2: unknown category 'beagle'"):
        load_pairs(csv, categories=["pug"])
    jl = folder / "pairs.jsonl"
    jl.write_text(json.dumps({"image": "pets/beagle/a.png", "caption": "x", "category": "beagle",
                              "attributes": ["brown"]}) + "\n"
                  + json.dumps({"image": "nope.png", "caption": "y", "category": "beagle"}) + "\n")
    with pytest.raises(PairDataError, match=r"pairs.jsonl: line 2: image file .*nope.png"):
        load_pairs(jl)


def test_class_name_swaps():
    assert swap_class_name("a red seven digit", "seven", "three") == "a red three digit"
    assert swap_class_name("a red sevens digit", "seven", "three") is None
    negs = sample_negatives("a red seven digit", "seven", ["a red one digit"], ["one", "seven", "three"], 2,
                            random.Random(0))
    assert negs == [("a red one digit", "one"), ("a red one digit", "one")] or negs[0] == ("a red one digit", "one")
    assert {c for _, c in negs} <= {"one", "three"}


def test_hard_negative_batches():
    from clip_ood.dcar.data import HardNegativeBatchSampler, Pair

    rng = random.Random(0)
    pairs = []
    for i in range(200):
        colour, bg, digit = rng.choice("rgbyw"), rng.choice("wxyz"), rng.choice("0123456789")
        pairs.append(Pair(f"{i}.png", f"a {colour} {digit} on {bg}", digit, [f"{colour} digit", f"{bg} background"]))
    pairs.append(Pair("no_attr.png", "something", "5", []))  # no attributes: random part only
    s = HardNegativeBatchSampler(pairs, batch_size=16, hard_share=0.5, group_size=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 13
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(pairs)))  # every pair once per epoch
    hard, heads = 0, 0
    for b in batches[:-1]:
        head = b[:8]  # hard_share 0.5 of 16: the groups come first
        heads += len(head)
        for i in head:  # a pair with the same attributes and another class in the head: a hard negative
            hard += any(pairs[j].attributes == pairs[i].attributes and pairs[j].category != pairs[i].category
                        for j in head if j != i)
    assert hard >= 0.8 * heads
    rand = HardNegativeBatchSampler(pairs, 16, 0.0, 4, 0)
    rand_hard = sum(any(pairs[j].attributes == pairs[i].attributes and pairs[j].category != pairs[i].category
                        for j in b[:8] if j != i) for b in list(rand)[:-1] for i in b[:8])
    assert rand_hard < 0.6 * heads  # random batches have far fewer
    again = HardNegativeBatchSampler(pairs, batch_size=16, hard_share=0.5, group_size=4, seed=1)
    assert list(again) == batches  # (seed, epoch) decides the order
    again.set_epoch(1)
    assert list(again) != batches
    assert all(len(b) == 16 for b in list(HardNegativeBatchSampler(pairs, 16, 0.0, 4, 0))[:-1])  # 0: random batches
    with pytest.raises(ValueError, match="hard_share"):
        HardNegativeBatchSampler(pairs, 16, 1.5)
