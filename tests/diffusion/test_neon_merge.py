"""neon_merge semantics on hand-made state dicts."""

import math

import pytest
import torch

from diffusion.neon import neon_merge
from diffusion.neon.merge import CheckpointMismatchError, check_w


def _pair():
    base = {
        "w32": torch.tensor([1.0, 2.0, -3.0]),
        "w16": torch.tensor([0.5, 1.5], dtype=torch.float16),
        "wbf": torch.tensor([[1.0, -1.0]], dtype=torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    selftrained = {
        "w32": torch.tensor([0.0, 2.5, -1.0]),
        "w16": torch.tensor([0.25, 2.0], dtype=torch.float16),
        "wbf": torch.tensor([[0.5, -2.0]], dtype=torch.bfloat16),
        "steps": torch.tensor(9, dtype=torch.int64),
        "mask": torch.tensor([False, True]),
    }
    return base, selftrained


def test_w_zero_returns_base_exactly():
    base, st = _pair()
    out = neon_merge(base, st, 0.0)
    assert list(out) == list(base)
    for k in base:
        assert out[k].dtype == base[k].dtype
        assert torch.equal(out[k], base[k])


@pytest.mark.parametrize("w", [0.5, 1.0, 2.5])
def test_formula_float32_and_dtypes_kept(w):
    base, st = _pair()
    out = neon_merge(base, st, w)
    for k in ("w32", "w16", "wbf"):
        expected = ((1 + w) * base[k].float() - w * st[k].float()).to(base[k].dtype)
        assert out[k].dtype == base[k].dtype
        torch.testing.assert_close(out[k], expected, rtol=0, atol=0)


def test_computed_in_float32_not_half():
    # in fp16, (1 + w) * 60000 overflows to inf; in float32 the result 60000 * 2 - 60000 = 60000 is representable
    base = {"a": torch.tensor([60000.0], dtype=torch.float16)}
    st = {"a": torch.tensor([60000.0], dtype=torch.float16)}
    out = neon_merge(base, st, 1.0)
    assert torch.isfinite(out["a"]).all() and float(out["a"]) == 60000.0


def test_non_float_copied_from_base():
    base, st = _pair()
    out = neon_merge(base, st, 1.0)
    assert torch.equal(out["steps"], base["steps"])
    assert torch.equal(out["mask"], base["mask"])
    assert neon_merge({"x": 3, "y": "s"}, {"x": 5, "y": "t"}, 1.0) == {"x": 3, "y": "s"}


def test_float_in_base_int_in_selftrained_copied():
    out = neon_merge({"a": torch.ones(2)}, {"a": torch.zeros(2, dtype=torch.long)}, 1.0)
    assert torch.equal(out["a"], torch.ones(2))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_entries_copied_from_base(bad):
    base = {"a": torch.tensor([1.0, bad]), "b": torch.tensor([1.0, 2.0]), "c": torch.tensor([1.0])}
    st = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0, bad]), "c": torch.tensor([0.0])}
    out = neon_merge(base, st, 1.0)
    assert torch.equal(out["a"], base["a"]) if not math.isnan(bad) else torch.equal(out["a"][:1], base["a"][:1])
    if math.isnan(bad):
        assert math.isnan(float(out["a"][1]))
    assert torch.equal(out["b"], base["b"])  # inf/nan in the self-trained entry: base kept
    assert torch.equal(out["c"], torch.tensor([2.0]))


def test_missing_keys_copied_and_extra_ignored():
    base = {"a": torch.ones(2), "only_base": torch.full((3,), 4.0)}
    st = {"a": torch.zeros(2), "only_self": torch.zeros(1)}
    out = neon_merge(base, st, 1.0)
    assert set(out) == {"a", "only_base"}
    assert torch.equal(out["only_base"], base["only_base"])
    assert torch.equal(out["a"], torch.full((2,), 2.0))


def test_shape_mismatch_names_key():
    with pytest.raises(ValueError, match="down.0.conv.weight"):
        neon_merge({"down.0.conv.weight": torch.ones(2, 3)}, {"down.0.conv.weight": torch.ones(3, 2)}, 1.0)
    with pytest.raises(CheckpointMismatchError):
        neon_merge({"k": torch.ones(2)}, {"k": torch.ones(2, 1)}, 1.0)


def test_inputs_not_modified_and_grad_free():
    base = {"a": torch.ones(2, requires_grad=True)}
    st = {"a": torch.zeros(2)}
    out = neon_merge(base, st, 1.0)
    assert not out["a"].requires_grad
    assert torch.equal(base["a"].detach(), torch.ones(2))


@pytest.mark.parametrize("w", [float("nan"), float("inf"), "abc", None])
def test_bad_w(w):
    with pytest.raises(ValueError, match="w must"):
        neon_merge({"a": torch.ones(1)}, {"a": torch.zeros(1)}, w)


def test_negative_w_warns_and_interpolates():
    with pytest.warns(UserWarning, match="w > 0"):
        out = neon_merge({"a": torch.ones(1)}, {"a": torch.zeros(1)}, -0.5)
    assert float(out["a"]) == 0.5
    assert check_w("1.5") == 1.5
