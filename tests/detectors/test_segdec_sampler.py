"""Frequency-of-use sampling: the probability formula, epoch statistics, determinism, resume, sharding, workers."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detectors.segdec import FrequencySampler, frequency_sampling_probs


def test_probs_all_zero_is_uniform():
    p = frequency_sampling_probs([0, 0, 0, 0, 0])
    assert torch.allclose(p, torch.full((5,), 0.2, dtype=torch.float64))


def test_probs_hand_checked():
    # f = [1, 0, 0, 3]: p = 1 - f/3 = [2/3, 1, 1, 0]; median (numpy: mean of the middle two) = 5/6
    # p - 5/6 + 1 = [5/6, 7/6, 7/6, 1/6]; ** (4 ln 4); normalised
    e = 4 * math.log(4)
    raw = [(5 / 6) ** e, (7 / 6) ** e, (7 / 6) ** e, (1 / 6) ** e]
    expected = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    p = frequency_sampling_probs(np.array([1, 0, 0, 3]))
    assert torch.allclose(p, expected, rtol=1e-10)
    # odd N: plain median; f = [2, 0, 1]: p = [0, 1, .5] - .5 + 1 = [.5, 1.5, 1] ** (4 ln 3)
    e3 = 4 * math.log(3)
    raw3 = [0.5**e3, 1.5**e3, 1.0**e3]
    assert torch.allclose(frequency_sampling_probs(torch.tensor([2, 0, 1])),
                          torch.tensor(raw3, dtype=torch.float64) / sum(raw3), rtol=1e-10)
    # rarely used negatives are favoured
    p = frequency_sampling_probs([5, 1, 3, 0])
    assert p[3] > p[1] > p[2] > p[0]
    assert float(frequency_sampling_probs([4.0]).sum()) == pytest.approx(1.0)


def test_probs_bad_input():
    with pytest.raises(ValueError):
        frequency_sampling_probs([])
    with pytest.raises(ValueError):
        frequency_sampling_probs([1, -1])
    with pytest.raises(ValueError):
        frequency_sampling_probs([1, float("nan")])


LABELS = [1] * 6 + [0] * 30


def test_every_positive_once_and_as_many_distinct_negatives():
    s = FrequencySampler(LABELS, seed=3)
    assert len(s) == 12
    for epoch in range(4):
        s.set_epoch(epoch)
        idx = list(s)
        assert len(idx) == 12
        c = Counter(idx)
        assert all(c[i] == 1 for i in range(6))  # each positive exactly once
        negs = [i for i in idx if i >= 6]
        assert len(negs) == 6 and len(set(negs)) == 6  # without replacement


def test_rarely_used_negatives_are_favoured():
    s = FrequencySampler(LABELS, seed=0)
    for epoch in range(5):  # 5 epochs x 6 negatives = each of the 30 negatives exactly once
        s.set_epoch(epoch)
        list(s)
    assert s.freq.tolist() == [1.0] * 30
    for epoch in range(5, 40):
        s.set_epoch(epoch)
        list(s)
    # usage stays balanced (uniform draws would spread much wider)
    assert float(s.freq.max() - s.freq.min()) <= 2
    u = FrequencySampler(LABELS, seed=0, frequency=False)
    for epoch in range(40):
        u.set_epoch(epoch)
        list(u)
    assert float(u.freq.sum()) == float(s.freq.sum()) == 240
    assert float(u.freq.max() - u.freq.min()) > float(s.freq.max() - s.freq.min())


def test_deterministic_per_seed_and_epoch_and_jumps_replay():
    a = FrequencySampler(LABELS, seed=7)
    seq = []
    for epoch in range(4):
        a.set_epoch(epoch)
        seq.append(list(a))
    b = FrequencySampler(LABELS, seed=7)
    b.set_epoch(3)  # jumping ahead replays epochs 0..2
    assert list(b) == seq[3]
    b.set_epoch(1)  # going back replays from scratch
    assert list(b) == seq[1]
    assert list(b) == seq[1]  # iterating twice gives the same list and counts once
    assert float(b.freq.sum()) == 12
    c = FrequencySampler(LABELS, seed=8)
    c.set_epoch(3)
    assert list(c) != seq[3]


def test_state_dict_exact_resume():
    a = FrequencySampler(LABELS, seed=1)
    for epoch in range(3):
        a.set_epoch(epoch)
        last = list(a)
    state = a.state_dict()
    a.set_epoch(3)
    want = list(a)
    b = FrequencySampler(LABELS, seed=1)
    b.load_state_dict(state)
    assert torch.equal(b.freq, state["freq"])
    b.set_epoch(2)  # mid-epoch resume: the same list again, no double counting
    assert list(b) == last and torch.equal(b.freq, state["freq"])
    b.set_epoch(3)
    assert list(b) == want
    with pytest.raises(ValueError, match="different data set"):
        FrequencySampler([1, 0, 0], seed=1).load_state_dict(state)


def test_sharding_across_ranks():
    full = FrequencySampler(LABELS, seed=2)
    full.set_epoch(1)
    glob = list(full)
    shards = []
    for rank in range(3):
        s = FrequencySampler(LABELS, seed=2, num_replicas=3, rank=rank)
        s.set_epoch(1)
        shards.append(list(s))
        assert len(s) == 4
    assert sorted(sum(shards, [])) == sorted(glob)
    with pytest.raises(ValueError):
        FrequencySampler(LABELS, num_replicas=2, rank=2)


def test_edge_cases():
    with pytest.raises(ValueError, match="no positive"):
        FrequencySampler([0, 0, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        FrequencySampler([0, 2])
    s = FrequencySampler([1, 1, 1, 1, 0, 0])  # fewer negatives than positives: several passes
    idx = list(s)
    assert len(idx) == 8 and Counter(i for i in idx if i >= 4) == {4: 2, 5: 2}
    only_pos = FrequencySampler([1, 1])
    assert sorted(only_pos) == [0, 1]


class _Idx(Dataset):
    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, i: int) -> int:
        return i


def test_works_with_worker_processes():
    s = FrequencySampler(LABELS, seed=4)
    loader = DataLoader(_Idx(), batch_size=4, sampler=s, num_workers=2)
    for epoch in range(2):
        s.set_epoch(epoch)
        got = torch.cat(list(loader)).tolist()
        assert got == s.epoch_indices(epoch)
    assert float(s.freq.sum()) == 12  # counted in the main process


_DDP_WORKER = r'''
import json, sys
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from detectors.segdec import FrequencySampler, SegDecConfig, train_segdec
from vision.engine import RunOptions, TrainConfig

class Idx(Dataset):
    def __len__(self):
        return 36
    def __getitem__(self, i):
        return i

out, data = sys.argv[1], sys.argv[2]
labels = [1] * 6 + [0] * 30
acc = Accelerator(cpu=True)
s = FrequencySampler(labels, seed=5)
loader = acc.prepare(DataLoader(Idx(), batch_size=2, sampler=s, num_workers=1))
seen = {}
for epoch in range(3):
    loader.set_epoch(epoch)
    seen[epoch] = torch.cat(list(loader)).tolist()
summary = train_segdec(data, SegDecConfig(width=0.25, final_eval=False), TrainConfig(epochs=2, batch_size=2, eval_every=0),
                       RunOptions(out=out + "/run", device="cpu", progress=False, workers=0))
json.dump({"seen": seen, "freq": s.freq.tolist(), "global": {e: s.epoch_indices(e) for e in range(3)},
           "steps": summary["steps"], "num_processes": summary["num_processes"]},
          open(f"{out}/rank{acc.process_index}.json", "w"))
'''


@pytest.mark.slow
def test_sampler_shards_across_two_processes_with_workers(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vision.data.defects import make_defects

    repo = Path(__file__).resolve().parents[2]
    data = make_defects(tmp_path / "data", n_train=12, n_test=0, img_size=32, seed=0)
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path), str(data)]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["freq"] == r1["freq"] and r0["global"] == r1["global"]  # identical state on every rank
    for epoch in ("0", "1", "2"):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == 6 and sorted(a + b) == sorted(r0["global"][epoch])  # disjoint halves
    assert r0["num_processes"] == 2 and r0["steps"] == r1["steps"] > 0
    assert (tmp_path / "run" / "checkpoints" / "last" / "sampler.safetensors").is_file()
