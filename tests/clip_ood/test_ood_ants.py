"""ANTS state: threshold rule, ENS cache, VSNL cache, lambda, modes, save/load; describers (offline parts)."""

import json

import pytest
import torch

from clip_ood.ants import ANTSConfig, ANTSState, ants_lambda, histogram_threshold
from clip_ood.describers import (
    Describer,
    LexiconDescriber,
    ScriptedDescriber,
    TransformersDescriber,
    create_describer,
    parse_label_list,
)
from clip_ood.encoders import encode_labels

ID = ["apple", "leaf", "stone"]


def test_histogram_threshold_hand_values():
    # bimodal: 20 at .05, 2 at .45, 40 at .95; bins of .09 from .05: counts [20,0,0,0,2,0,0,0,0,40]
    # main peak = bin 9; first minimum left of it = bin 1 (empty) with 20 further left -> centre (.14 + .23) / 2
    s = [0.05] * 20 + [0.45] * 2 + [0.95] * 40
    assert histogram_threshold(s) == pytest.approx(0.185)
    # flat: no valley -> upper edge of the lowest bin (0.1); the median (0.5) does not cap it
    assert histogram_threshold([i / 100 for i in range(101)]) == pytest.approx(0.1)
    # most scores low (a 60 % OOD stream): the valley still splits the modes (the earlier rule, left of the highest
    # bin and capped at the median, gave 0.05 and called no image negative)
    assert histogram_threshold([0.05] * 60 + [0.95] * 40) == pytest.approx(0.185)
    assert histogram_threshold([0.05] * 90 + [0.5] * 3 + [0.95] * 10) == pytest.approx(0.185)  # 90 % OOD
    # the optional cap: percentile 0.5 = the median
    assert histogram_threshold([0.05] * 60 + [0.95] * 40, percentile=0.5) == pytest.approx(0.05)
    # the deepest valley wins over a shallow one: counts [30,5,25,0,0,0,0,0,2,40] -> bin 3..7 (depth 25), leftmost
    s = [0.05] * 30 + [0.14] * 5 + [0.23] * 25 + [0.86] * 2 + [0.95] * 40
    assert histogram_threshold(s) == pytest.approx((0.32 + 0.41) / 2)


def test_vsnl_takes_every_class_from_the_first_batch_when_they_fit_in_the_top_k(tiny_encoder):
    """With no more ID classes than vsnl_top_classes, the near names do not wait for predicted-class counts."""
    similar = {"apple": ["pear"], "leaf": ["fern"], "stone": ["pebble"]}
    d = ScriptedDescriber(similar=similar)
    st = _state(tiny_encoder, d, threshold_init=-1.0)  # no image is negative: no class counts at all
    st.step(encode_labels(tiny_encoder, ["apple"], ("The nice {}.",), cache_dir=False))
    assert sorted(d.similar_calls) == sorted(ID) and sorted(st.near_texts) == ["fern", "pear", "pebble"]
    d2 = ScriptedDescriber(similar=similar)
    st2 = _state(tiny_encoder, d2, threshold_init=-1.0, vsnl_top_classes=2)  # 3 classes > top 2: counts needed
    st2.step(encode_labels(tiny_encoder, ["apple"], ("The nice {}.",), cache_dir=False))
    assert d2.similar_calls == []  # no negative image yet: no counts, no names


def test_vsnl_auto_start_with_more_classes_than_the_top_k(tiny_encoder):
    """More ID classes than vsnl_top_classes: the top-k of the counts so far from batch 0, refreshed every batch
    while the counts form (batches 0-9), then every vsnl_every batches from batch 10."""
    similar = {"apple": ["pear"], "leaf": ["fern"], "stone": ["pebble"]}
    d = ScriptedDescriber(similar=similar)
    st = _state(tiny_encoder, d, threshold_init=2.0, vsnl_top_classes=1, vsnl_every=40)  # every image negative
    st.step(encode_labels(tiny_encoder, ["leaf"], ("The nice {}.",), cache_dir=False))
    top = ID[st.class_counts.most_common(1)[0][0]]
    assert d.similar_calls == [top] and st.near_texts == similar[top]  # batch 0: names of the top class already
    due = []
    for b in range(100):
        st.batches = b
        due.append(st._vsnl_due())
    assert [b for b, x in enumerate(due) if x] == list(range(10)) + [10, 50, 90]
    st.config.vsnl_start = 10  # an explicit start keeps the plain schedule
    st.batches = 3
    assert not st._vsnl_due()


def test_ants_lambda():
    assert ants_lambda(0.8, 0.6) == pytest.approx(0.2 / 0.6)
    assert ants_lambda(1.0, 1.0) == 0.5
    assert ants_lambda(0.5, 0.5) == 0.5


def _state(enc, describer, mode="ada", **kw):
    id_f = encode_labels(enc, ID, ("The nice {}.",), cache_dir=False)
    neg_f = encode_labels(enc, [f"thing{i}" for i in range(20)], ("The nice {}.",), cache_dir=False)
    return ANTSState(enc, ID, id_f, neg_f, describer=describer, mode=mode, config=ANTSConfig(num_groups=4, **kw))


class Counter:
    def __init__(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return f"sentence {self.i}"


def test_ens_cache_threshold_and_lambda(tiny_encoder):
    d = ScriptedDescriber(sentences=["a dog", "a dog", "a car"])
    st = _state(tiny_encoder, d, threshold_init=2.0, warmup=6, max_updates=2, far_bank_size=4,
                vsnl_start=100)
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(3, 32, generator=g)
    out = st.step(f1)
    assert out["negative"].all()  # tau 2.0 > every score in [0, 1]
    assert st.far_texts == ["a dog", "a car"]  # described, deduplicated
    assert st.far_features.shape == (2, 32) and st.updates == 1
    assert st.tau == 2.0  # 3 seen < warmup 6
    # running means and lambda over negative images
    lam = ants_lambda(float(out["s_ens"].mean()), float(out["s_vsnl"].mean()))
    assert st.lambda_ == pytest.approx(lam)
    assert torch.allclose(out["score"], lam * out["s_ens"] + (1 - lam) * out["s_vsnl"])
    assert torch.allclose(out["s_vsnl"], out["base"])  # no near negatives yet
    # second batch: new sentences are prepended; bank capped at 4; threshold now from the histogram rule
    d._sentences = iter(["new one", "a dog", "new two"])
    st.step(torch.randn(3, 32, generator=g))
    assert st.far_texts == ["new one", "new two", "a dog", "a car"]
    assert st.tau == pytest.approx(histogram_threshold(st.history))
    assert len(st.history) == 6 and st.updates == 2
    # max_updates reached: no more describing
    calls = d.describe_calls
    st.tau = 2.0
    st.step(torch.randn(3, 32, generator=g))
    assert d.describe_calls == calls
    st.reset()
    assert st.far_texts == [] and st.tau == 2.0 and st.num_neg == 0


def test_ens_bank_keeps_newest(tiny_encoder):
    d = ScriptedDescriber(sentences=[f"s{i}" for i in range(100)])
    st = _state(tiny_encoder, d, threshold_init=2.0, far_bank_size=5, max_updates=10, vsnl_start=100)
    for _ in range(3):
        st.step(torch.randn(2, 32))
    assert st.far_texts == ["s4", "s5", "s2", "s3", "s0"]
    assert st.far_features.shape[0] == 5


def test_vsnl_schedule_cache_and_eviction(tiny_encoder):
    similar = {"apple": ["pear", "Leaf", "quince", "peach"], "leaf": ["fern", "frond"], "stone": ["pebble", "rock"]}
    d = ScriptedDescriber(similar=similar)
    st = _state(tiny_encoder, d, threshold_init=2.0, vsnl_start=1, vsnl_every=2, vsnl_top_classes=2,
                vsnl_per_class=3, vsnl_cache_size=2)
    feats = encode_labels(tiny_encoder, ["apple", "apple", "leaf"], ("The nice {}.",), cache_dir=False)
    st.step(feats)  # batch 0: not due
    assert d.similar_calls == []
    st.step(feats)  # batch 1: due (start)
    top2 = [ID[c] for c, _ in st.class_counts.most_common(2)]
    assert sorted(d.similar_calls) == sorted(top2)
    for c in top2:
        assert "Leaf" not in st.near_cache[c] and len(st.near_cache[c]) <= 3  # ID names filtered, k per class
    assert st.near_features.shape[0] == len(st.near_texts) > 0
    st.step(feats)  # batch 2: not due
    n_calls = len(d.similar_calls)
    st.step(feats)  # batch 3: due again, classes cached -> no new calls
    assert len(d.similar_calls) == n_calls
    # a new most-predicted class evicts the least recently used one (cache size 2)
    missing = next(i for i, c in enumerate(ID) if c not in st.near_cache)
    st.class_counts[missing] += 1000
    st.step(feats)
    st.step(feats)  # batch 5: due
    assert ID[missing] in st.near_cache and len(st.near_cache) == 2


def test_modes_and_save_load(tiny_encoder, tmp_path):
    d = ScriptedDescriber(sentences=["a dog", "a car", "a tree"], similar={"apple": ["pear"]})
    st = _state(tiny_encoder, d, threshold_init=2.0, vsnl_start=0, vsnl_every=1, warmup=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        st.step(torch.randn(2, 32, generator=g))
    st.save(tmp_path / "ants_state")
    st2 = _state(tiny_encoder, ScriptedDescriber(sentences=["x"]), vsnl_start=0).load(tmp_path / "ants_state")
    assert st2.far_texts == st.far_texts and st2.near_cache == st.near_cache and st2.tau == st.tau
    assert st2.lambda_ == pytest.approx(st.lambda_) and st2.batches == st.batches
    assert torch.equal(st2.far_features, st.far_features)
    x = torch.randn(2, 32, generator=g)
    st.max_updates = st2.max_updates = 0
    st.config.max_updates = st2.config.max_updates = 0
    st.config.vsnl_every = st2.config.vsnl_every = 1000
    a, b = st.step(x), st2.step(x)
    assert torch.allclose(a["score"], b["score"], atol=1e-6)
    st.mode = "far_only"
    o = st.step(x)
    assert torch.equal(o["score"], o["s_ens"])
    st.mode = "near_only"
    o = st.step(x)
    assert torch.equal(o["score"], o["s_vsnl"])
    with pytest.raises(ValueError):
        _state(tiny_encoder, d, mode="both")
    other = ANTSState(tiny_encoder, ["x"], torch.randn(1, 32), torch.randn(3, 32), describer=d)
    with pytest.raises(ValueError, match="other ID labels"):
        other.load(tmp_path / "ants_state")


def test_lexicon_describer_offline_fallback(tiny_encoder):
    words = ["dog", "car", "tree", "apple", "river"]
    lx = LexiconDescriber(tiny_encoder, words=words, k=2)
    assert isinstance(lx, Describer)
    wf = encode_labels(tiny_encoder, words, ("The nice {}.",), cache_dir=False)
    out = lx.describe(None, wf[[1, 4]])  # an image feature equal to a word feature describes it with that word
    assert out[0].startswith("a photo of car") and out[1].startswith("a photo of river")
    sim = lx.similar_labels("apple", k=3)
    assert len(sim) == 3 and "apple" not in sim and set(sim) <= set(words)
    assert isinstance(create_describer("scripted"), ScriptedDescriber)


def test_transformers_describer_is_lazy_and_fails_clearly(tmp_path):
    td = create_describer("qwen2-vl", model=str(tmp_path / "no_such_model"))
    assert isinstance(td, TransformersDescriber) and not td.loaded
    assert td.model_name.endswith("no_such_model")
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="lexicon"):
        td.describe([Image.new("RGB", (8, 8))])
    blip = TransformersDescriber(kind="blip", fallback=ScriptedDescriber(similar={"cat": ["lynx"]}))
    assert blip.similar_labels("cat") == ["lynx"] and not blip.loaded
    with pytest.raises(ValueError):
        TransformersDescriber(kind="gpt")


def test_parse_label_list():
    assert parse_label_list("1. fox, 2) wolf\n- coyote; Fox", 5) == ["fox", "wolf", "coyote"]
    assert parse_label_list("a, b, c", 2) == ["a", "b"]


@pytest.mark.parametrize("damage,says", [
    ("json_cut", "not a readable ANTS state"),
    ("json_key", "lacks tau"),
    ("features_cut", "damaged checkpoint file"),
    ("features_missing", "needs its features file"),
])
def test_damaged_state_file_is_one_error_naming_it(tiny_encoder, tmp_path, damage, says):
    d = ScriptedDescriber(sentences=["a dog"])
    st = _state(tiny_encoder, d, vsnl_start=0, warmup=2)
    st.step(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)))
    base = tmp_path / "ants_state"
    st.save(base)
    j, t = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if damage == "json_cut":
        j.write_text(j.read_text()[:30])
    elif damage == "json_key":
        s = json.loads(j.read_text())
        del s["tau"]
        j.write_text(json.dumps(s))
    elif damage == "features_cut":
        t.write_bytes(t.read_bytes()[:-16])
    else:
        t.unlink()
    fresh = _state(tiny_encoder, d, vsnl_start=0, warmup=2)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=says) as exc:
        fresh.load(base)
    assert str(t if damage.startswith("features") else j) in str(exc.value)
    assert fresh.state_dict() == before  # nothing half-loaded
