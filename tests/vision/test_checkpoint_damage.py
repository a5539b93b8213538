"""Checkpoints survive damage: sizes + sha256 in meta.json, verify_checkpoint, fallback resume, one-line errors,
keep_last and file modes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from vision.engine import (
    CheckpointCorruptError,
    TrainConfig,
    Trainer,
    load_model_weights,
    load_training_state,
    save_checkpoint_atomic,
    verify_checkpoint,
)

# ------------------------------------------------------------------------------------------------ toys


def make_data(n: int = 18) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 3.0, 0.5]))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def cfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out), batch_size=4, max_steps=6, checkpoint_every=1, lr=0.05, device="cpu", progress=False, eval_every=0
    )
    base.update(kw)
    return TrainConfig(**base)


def trainer(out: Path, callbacks=(), **kw) -> Trainer:
    return Trainer(
        make_model(), make_data(), cfg(out, **kw), loss_fn=mse_loss, callbacks=callbacks
    )


def crash_at(step: int):
    def cb(tr, event, info):
        if event == "step_end" and info["step"] == step:
            raise RuntimeError("simulated crash")

    return cb


def crashed_run(out: Path, at: int = 4, **kw) -> Path:
    """A run killed at step ``at``: checkpoints/last = step at-1, step-XXXXXXX = step at-2."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(out, callbacks=[crash_at(at)], **kw).fit()
    return out / "checkpoints"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_bit(path: Path, where: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------------------ tests


def test_meta_lists_sizes_and_sha256(tmp_path):
    d = save_checkpoint_atomic(
        tmp_path / "ck", make_model(), {"step": 3}, meta={"step": 3}, json_files={"metrics.json": {"a": 1}}
    )
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 3
    assert set(meta["files"]) == {"model.safetensors", "training_state.pt", "metrics.json"}
    for name, rec in meta["files"].items():
        data = (d / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(d) == d
    # through the Trainer as well
    tr = trainer(tmp_path / "run", max_steps=2)
    tr.fit()
    last = tmp_path / "run" / "checkpoints" / "last"
    assert verify_checkpoint(last) == last
    assert set(json.loads((last / "meta.json").read_text())["files"]) == {
        "model.safetensors",
        "training_state.pt",
    }


@pytest.mark.parametrize(
    "damage",
    ["truncate-model", "truncate-state", "bitflip-model", "bitflip-state"],
)
def test_resume_falls_back_to_older_checkpoint(tmp_path, caplog, damage):
    ref = trainer(tmp_path / "ref")
    ref.fit()
    ck = crashed_run(tmp_path / "run")
    assert sorted(p.name for p in ck.iterdir()) == ["last", "step-0000002"]
    kind, which = damage.split("-")
    bad = ck / "last" / ("model.safetensors" if which == "model" else "training_state.pt")
    size = bad.stat().st_size
    (truncate if kind == "truncate" else flip_bit)(bad)
    assert (bad.stat().st_size == size) == (kind == "bitflip")
    with pytest.raises(CheckpointCorruptError) as info:
        verify_checkpoint(ck / "last")
    assert info.value.path == bad
    assert one_line(info.value).startswith(f"{bad}: damaged checkpoint file (")
    assert ("sha256 differs" if kind == "bitflip" else f"size {bad.stat().st_size} bytes") in str(info.value)

    tr = trainer(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="negvision.engine"):
        summary = tr.fit(resume=True)
    warnings = [r.getMessage() for r in caplog.records if "falling back to" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0] and str(ck / "step-0000002") in warnings[0]
    assert summary["steps"] == 6
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["resumed_from"] == str(ck / "step-0000002")
    # exact resume from the older copy: same result as the uninterrupted run
    for k, v in params(ref.unwrapped_model).items():
        assert torch.equal(v, params(tr.unwrapped_model)[k]), k
    # the damaged "last" was replaced, not kept as an older copy
    assert sorted(p.name for p in ck.iterdir()) == ["last", "step-0000005"]
    verify_checkpoint(ck / "last")
    verify_checkpoint(ck / "step-0000005")


def test_all_checkpoints_damaged_raises(tmp_path):
    ck = crashed_run(tmp_path / "run")
    truncate(ck / "last" / "model.safetensors")
    flip_bit(ck / "step-0000002" / "training_state.pt")
    tr = trainer(tmp_path / "run")
    with pytest.raises(CheckpointCorruptError) as info:
        tr.fit(resume=True)
    lines = str(info.value).splitlines()
    bad = ck / "last" / "model.safetensors"
    assert info.value.path == bad
    assert lines[0].startswith(f"{bad}: damaged checkpoint file (size ")
    assert any(str(ck / "step-0000002" / "training_state.pt") in ln and "sha256" in ln for ln in lines[1:])
    assert len(lines) == 3  # first line + one per checkpoint tried


def test_explicit_resume_path_does_not_fall_back(tmp_path):
    ck = crashed_run(tmp_path / "run")
    truncate(ck / "last" / "training_state.pt")
    with pytest.raises(CheckpointCorruptError) as info:
        trainer(tmp_path / "run").fit(resume=str(ck / "last"))
    assert one_line(info.value).startswith(f"{ck / 'last' / 'training_state.pt'}: damaged checkpoint file")
    # an intact explicit directory is used as given
    summary = trainer(tmp_path / "run").fit(resume=str(ck / "step-0000002"))
    assert summary["steps"] == 6


def test_load_model_weights_on_damaged_standalone_files(tmp_path):
    model = make_model()
    save_checkpoint_atomic(tmp_path / "ck", model, None)
    # standalone copies (no meta.json beside them)
    st = tmp_path / "loose" / "w.safetensors"
    st.parent.mkdir()
    st.write_bytes((tmp_path / "ck" / "model.safetensors").read_bytes())
    load_model_weights(make_model(), st)
    truncate(st, 0.8)
    with pytest.raises(CheckpointCorruptError, match="truncated safetensors: header says") as info:
        load_model_weights(make_model(), st)
    assert one_line(info.value).startswith(f"{st}: damaged checkpoint file (") and info.value.path == st

    junk = tmp_path / "loose" / "w.safetensors.bak.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointCorruptError, match="not a safetensors file"):
        load_model_weights(make_model(), junk)

    pt = tmp_path / "loose" / "random.pt"
    pt.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointCorruptError) as info:
        load_model_weights(make_model(), pt)
    assert one_line(info.value).startswith(f"{pt}: damaged checkpoint file (cannot unpickle")

    good = tmp_path / "loose" / "good.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "loose" / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointCorruptError) as info:
        load_model_weights(make_model(), truncated)
    assert one_line(info.value).startswith(f"{truncated}: damaged checkpoint file")

    # inside a checkpoint dir, the sha256 of meta.json is checked first (bit flip in the data: same size)
    flip_bit(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointCorruptError, match="sha256 differs from meta.json"):
        load_model_weights(make_model(), tmp_path / "ck")


def test_load_training_state_on_damaged_file(tmp_path):
    d = save_checkpoint_atomic(tmp_path / "ck", make_model(), {"step": 1, "x": torch.arange(1000)})
    assert load_training_state(d)["step"] == 1
    truncate(d / "training_state.pt")
    with pytest.raises(CheckpointCorruptError, match="size .* bytes, meta.json says") as info:
        load_training_state(d)
    one_line(info.value)
    with pytest.raises(CheckpointCorruptError, match="cannot unpickle training state") as info:
        load_training_state(d, verify=False)
    one_line(info.value)


def _make_legacy(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]
    (d / "meta.json").write_text(json.dumps(meta))


def test_legacy_checkpoint_without_files_entry(tmp_path):
    ck = crashed_run(tmp_path / "run")
    for d in (ck / "last", ck / "step-0000002"):
        _make_legacy(d)
        assert verify_checkpoint(d) == d
    fresh = make_model()
    load_model_weights(fresh, ck / "last")
    assert load_training_state(ck / "last")["step"] == 3
    summary = trainer(tmp_path / "run").fit(resume=True)  # resumes from the legacy "last"
    assert summary["steps"] == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resumed_from"] == str(ck / "last")

    # structural checks catch truncation without checksums
    ck = crashed_run(tmp_path / "run2")
    _make_legacy(ck / "last")
    _make_legacy(ck / "step-0000002")
    truncate(ck / "last" / "model.safetensors", 0.9)
    with pytest.raises(CheckpointCorruptError, match="truncated safetensors: header says \\d+ bytes of data"):
        verify_checkpoint(ck / "last")
    save_checkpoint_atomic(tmp_path / "legacy", make_model(), {"step": 1})
    _make_legacy(tmp_path / "legacy")
    truncate(tmp_path / "legacy" / "training_state.pt")
    with pytest.raises(CheckpointCorruptError) as info:
        verify_checkpoint(tmp_path / "legacy")
    assert info.value.path == tmp_path / "legacy" / "training_state.pt"
    one_line(info.value)
    # and the Trainer falls back from the truncated legacy "last"
    summary = trainer(tmp_path / "run2").fit(resume=True)
    assert summary["steps"] == 6
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["resumed_from"] == str(
        ck / "step-0000002"
    )


@pytest.mark.parametrize(
    "keep_last,expected", [(1, []), (2, ["step-0000003"]), (3, ["step-0000002", "step-0000003"])]
)
def test_keep_last(tmp_path, keep_last, expected):
    assert TrainConfig(out_dir=str(tmp_path)).keep_last == 2
    trainer(tmp_path, max_steps=4, keep_last=keep_last).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == sorted(["last", *expected])


def test_keep_last_after_resume(tmp_path):
    ck = crashed_run(tmp_path, at=4)  # last = 3, step-0000002
    trainer(tmp_path).fit(resume=True)
    assert sorted(p.name for p in ck.iterdir()) == ["last", "step-0000005"]
    # a later run in the same out_dir starting afresh does not keep the old, further-on copies
    trainer(tmp_path, max_steps=2).fit()
    assert sorted(p.name for p in ck.iterdir()) == ["last", "step-0000001"]


def test_checkpoint_modes_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainer(tmp_path, max_steps=2).fit()
        d = save_checkpoint_atomic(tmp_path / "ck" / "best", make_model(), None, json_files={"m.json": {}})
    finally:
        os.umask(old)
    last = tmp_path / "checkpoints" / "last"
    for directory in (last, tmp_path / "checkpoints" / "step-0000001", d):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    for name in ("model.safetensors", "meta.json", "training_state.pt"):
        assert stat.S_IMODE((last / name).stat().st_mode) == 0o644, name
    for name in ("model.safetensors", "meta.json", "m.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644, name


def test_falls_back_when_damage_shows_only_on_loading(tmp_path, monkeypatch, caplog):
    import vision.engine.trainer as trainer_mod

    ck = crashed_run(tmp_path / "run")
    truncate(ck / "last" / "training_state.pt")
    monkeypatch.setattr(trainer_mod, "verify_checkpoint", lambda d: Path(d))  # as if verify saw nothing
    with caplog.at_level(logging.WARNING, logger="negvision.engine"):
        summary = trainer(tmp_path / "run").fit(resume=True)
    assert summary["steps"] == 6
    msgs = [r.getMessage() for r in caplog.records if "falling back to" in r.getMessage()]
    assert len(msgs) == 1 and "cannot unpickle training state" in msgs[0]
    assert str(ck / "last" / "training_state.pt") in msgs[0]


def test_intact_pickle_that_weights_only_refuses_is_not_called_damaged(tmp_path):
    torch.save(make_model(), tmp_path / "whole_model.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only=True") as info:
        load_model_weights(make_model(), tmp_path / "whole_model.pt")
    assert not isinstance(info.value, CheckpointCorruptError)
    one_line(info.value)


def test_a_new_run_in_a_used_folder_starts_empty_logs(tmp_path: Path) -> None:
    trainer(tmp_path / "run", log_every=1).fit()
    trainer(tmp_path / "run", max_steps=2, log_every=1).fit()  # not a resume: the old rows must not stay
    rows = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[0] == "1"  # header + steps 1 and 2
    assert len(list((tmp_path / "run" / "tb").glob("events.*"))) <= 1


def test_resume_forgets_a_damaged_best_and_writes_a_new_one(tmp_path, caplog):
    """A damaged checkpoints/best found on resume is named in a warning and replaced at the next evaluation, so
    the run does not end on a file nobody can load."""
    data = make_data()

    def eval_fn(model):
        x, y = data.tensors
        return {"neg_mse": -float(((model(x).squeeze(-1) - y) ** 2).mean())}

    def run(callbacks=()):
        return Trainer(make_model(), data, cfg(tmp_path / "run", max_steps=15, eval_every=1), loss_fn=mse_loss, eval_fn=eval_fn, metric="neg_mse", callbacks=callbacks)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([crash_at(12)]).fit()
    best = tmp_path / "run" / "checkpoints" / "best"
    verify_checkpoint(best)
    truncate(best / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="negvision.engine"):
        summary = run().fit(resume=True)
    warned = [r.getMessage() for r in caplog.records if "best checkpoint is forgotten" in r.getMessage()]
    assert len(warned) == 1 and str(best / "model.safetensors") in warned[0]
    assert summary["steps"] == 15
    verify_checkpoint(best)  # rewritten by the evaluation after the resume
    load_model_weights(make_model(), best)


def test_check_weights_file_and_read_weights(tmp_path):
    from safetensors.torch import save_file

    from vision.engine import read_weights
    from vision.weights_io import check_weights_file

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    st, pt = tmp_path / "a.safetensors", tmp_path / "a.pt"
    save_file(sd, str(st))
    torch.save(sd, pt)
    for f in (st, pt):  # whole files pass and read back
        check_weights_file(f)
        assert torch.equal(read_weights(f)["w"], sd["w"])
    for f in (st, pt):  # cut short: one error naming the file
        f.write_bytes(f.read_bytes()[:-12])
        with pytest.raises(CheckpointCorruptError) as exc:
            check_weights_file(f)
        assert exc.value.path == f and str(f) in str(exc.value).splitlines()[0]
    other = tmp_path / "legacy.pkl"
    other.write_bytes(b"\x80\x02}q\x00.")  # not a zip: nothing cheap to check, left to the loader
    check_weights_file(other)
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.safetensors")
