"""Smoke tests of benchmarks/segdec_speed.py and benchmarks/segdec_ablation.py at tiny sizes: one JSON line each."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, args: list[str], monkeypatch, capsys) -> dict:
    spec = importlib.util.spec_from_file_location(script.replace(".py", ""), BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [script, *args])
    threads = torch.get_num_threads()
    try:
        mod.main()
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_speed_benchmark_smoke(monkeypatch, capsys):
    out = _run("segdec_speed.py", ["--img-size", "64", "--width", "0.25", "--steps", "1", "--warmup", "0",
                                   "--device", "cpu", "--threads", "1"], monkeypatch, capsys)
    assert out["benchmark"] == "segdec_speed" and out["img_size"] == "64x64"
    assert out["train_images_per_s"] > 0 and out["infer_images_per_s"] > 0 and out["peak_memory_mb_train"] > 0
    assert out["reference"]["train_images_per_s"] > 0 and out["reference"]["model"].startswith("torchvision resnet18")


def test_ablation_benchmark_smoke(monkeypatch, capsys, tmp_path):
    out = _run("segdec_ablation.py", ["--n-train", "12", "--n-test", "6", "--img-size", "32", "--epochs", "1",
                                      "--variants", "full,weak_supervision", "--cpu", "--out", str(tmp_path)],
               monkeypatch, capsys)
    assert out["benchmark"] == "segdec_ablation" and set(out["results"]) == {"full", "weak_supervision"}
    for r in out["results"].values():
        assert {"AP", "AUROC", "detection_rate", "FP", "FN", "FP_at_FN0", "dice"} <= set(r)
        assert 0.0 <= r["AP"] <= 1.0 or r["AP"] != r["AP"]  # NaN if the tiny test split has no defect
    with pytest.raises(SystemExit):
        _run("segdec_ablation.py", ["--variants", "nonsense"], monkeypatch, capsys)


def test_weak_benchmark_smoke(monkeypatch, capsys, tmp_path):
    out = _run("segdec_weak.py", ["--seeds", "0", "--n-train", "12", "--n-val", "6", "--n-test", "6", "--img-size", "32",
                                  "--epochs", "1", "--official-epochs", "1", "--paper-width", "0.25", "--masks", "0,1",
                                  "--out", str(tmp_path)], monkeypatch, capsys)
    assert out["benchmark"] == "segdec_weak" and out["seeds"] == [0]
    assert set(out["summary"]) == {"texture_lr", "official_weak", "default_masks_0pct", "default_masks_100pct"}
    for v in out["summary"].values():
        assert 0 <= v["AUROC"]["mean"] <= 1 and v["AUROC"]["std"] == 0
    assert out["default_minus_texture_lr_auroc"] is not None
