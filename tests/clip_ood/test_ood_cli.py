"""`negvision ood` commands end to end on a tiny random open_clip model saved as local-dir (in process)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from clip_ood.cli import ood_app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _invoke(args, env=None):
    r = runner.invoke(ood_app, args, env=env)
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tiny_model_dir, image_folders, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "classes.txt").write_text("apple\nleaf\n")
    (d / "words.txt").write_text("".join(f"thing{i}\n" for i in range(30)) + "adj\tshiny\nadj\tdull\n")
    return {"model": f"local-dir:{tiny_model_dir}", "dir": d, "img": image_folders}


def test_help_is_light():
    code = ("import sys, typer; from clip_ood.cli import ood_app; cmd = typer.main.get_command(ood_app); "
            "from click.testing import CliRunner; r = CliRunner().invoke(cmd, ['--help']); "
            "assert 'mine-labels' in r.output, r.output; "
            "print([m for m in ('torch', 'open_clip', 'fastapi', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert sorted(typer.main.get_command(ood_app).commands) == ["bench", "metrics", "mine-labels", "score", "serve"]


def test_mine_then_score_resumable_and_sharded(setup, monkeypatch):
    d, model = setup["dir"], setup["model"]
    res = _invoke(["mine-labels", "--id-labels", str(d / "classes.txt"), "--model", model, "--words",
                   str(d / "words.txt"), "--num-negatives", "16", "--out", str(d / "neg.txt")])
    assert res["negatives"] == 16 and res["adjectives"] == 1
    lines = (d / "neg.txt").read_text().splitlines()
    assert len(lines) == 16 and all(line.split("\t")[0] in ("noun", "adj") for line in lines)

    out = d / "scores.csv"
    args = ["score", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "neglabel",
            "--neg-labels", str(d / "neg.txt"), "--source", str(setup["img"] / "id"), "--out", str(out),
            "--batch-size", "3"]
    res = _invoke(args)
    assert res["scored"] == 8
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 8 and set(rows[0]) == {"path", "score", "is_ood", "top_class", "top_prob"}
    assert all(0 <= float(r["score"]) <= 1 and r["top_class"] in ("apple", "leaf") for r in rows)
    res = _invoke(args)  # resumed: nothing left
    assert res["scored"] == 0 and res["skipped_done"] == 8
    assert len(list(csv.DictReader(open(out)))) == 8
    # a corrupt image: clear error naming it, or skipped with --skip-bad
    bad_dir = d / "bad"
    bad_dir.mkdir()
    (bad_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (bad_dir / "ok.png").write_bytes((setup["img"] / "noise" / "0.png").read_bytes())
    bad_args = args[:-6] + ["--source", str(bad_dir), "--out", str(d / "bad.csv")]
    r = runner.invoke(ood_app, bad_args)
    assert r.exit_code == 1 and "broken.png" in r.output and "--skip-bad" in r.output
    res = _invoke(bad_args + ["--skip-bad", "--no-resume"])
    assert res["scored"] == 1
    # under accelerate / torchrun each rank scores its shard into its own file
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = _invoke(args[:-4] + ["--out", str(d / "sharded.csv")])
    assert res["rank"] == 1 and res["scored"] == 4
    assert (d / "sharded.rank1.csv").is_file()


def test_bench_mcm_and_ants(setup):
    d, model, img = setup["dir"], setup["model"], setup["img"]
    out = d / "bench_mcm"
    res = _invoke(["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(img / "noise"),
                   "--ood-dir", str(img / "dark"), "--method", "mcm", "--out-dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_set"]) == {"noise", "dark"}
    for k in ("auroc", "fpr95", "aupr_in", "aupr_out"):
        assert 0 <= res["average"][k] <= 1
    assert (out / "roc_noise.png").stat().st_size > 0 and (out / "hist_dark.png").is_file()
    with Image.open(out / "roc_logfpr.png") as im:  # one log-FPR ROC, a curve (and legend line) per OOD set
        assert im.format == "PNG" and im.size == (640, 520)
    assert len(list(csv.DictReader(open(out / "scores.csv")))) == 16
    # the run-folder rule of every command: a used --out becomes OUT2 unless --exist-ok
    again = ["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(img / "noise"), "--method", "mcm",
             "--out-dir", str(out)]
    assert runner.invoke(ood_app, again).exit_code == 0 and (d / "bench_mcm2" / "metrics.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["per_set"].keys() == {"noise", "dark"}  # left alone
    assert runner.invoke(ood_app, [*again, "--exist-ok"]).exit_code == 0 and not (d / "bench_mcm3").exists()
    assert json.loads((out / "metrics.json").read_text())["per_set"].keys() == {"noise"}
    # OpenOOD-style list for the OOD set; ANTS on the mixed shuffled stream with the scripted describer
    (d / "ood_list.txt").write_text("".join(f"noise/{i}.png 0\n" for i in range(4)))
    out = d / "bench_ants"
    _invoke(["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(d / "ood_list.txt"),
             "--data-root", str(img), "--method", "ants", "--neg-labels", str(d / "neg.txt"), "--describer",
             "scripted", "--batch-size", "4", "--out-dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_set"]) == {"ood_list"} and "lambda" in m["ants"]
    assert m["ants"]["far_bank"] >= 1  # the 0.8 initial threshold caught some images


def test_score_shared_option_names_through_the_root_group(setup, tmp_path):
    """--conf (old spelling --threshold), --batch, a bare --resume (the root group passes it as "last")."""
    from vision.cli import app

    d, model = setup["dir"], setup["model"]
    out = tmp_path / "s.csv"
    args = ["ood", "score", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm", "--source",
            str(setup["img"] / "id"), "--out", str(out), "--batch", "4", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--conf", "2"])  # MCM scores are <= 1: every image is OOD
    assert r.exit_code == 0, r.output
    assert {row["is_ood"] for row in csv.DictReader(open(out))} == {"1"}
    r = runner.invoke(app, [*args, "--threshold", "0", "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped_done"] == 8
    r = runner.invoke(app, [*args, "--threshold", "0", "--no-resume"])
    assert r.exit_code == 0, r.output
    assert {row["is_ood"] for row in csv.DictReader(open(out))} == {"0"} and len(list(csv.DictReader(open(out)))) == 8
    r = runner.invoke(app, [*args, "--resume", "maybe"])
    assert r.exit_code == 2 and "--resume takes no value here" in r.output


@pytest.mark.parametrize("cmd, extra", [
    ("score", ["--id-labels", "x", "--source", "s"]),
    ("bench", ["--id-dir", "i", "--ood-dir", "o"]),
    ("serve", ["--id-labels", "x"]),
])
def test_wrong_ants_mode_or_device_exits_2(cmd, extra):
    from vision.cli import app

    r = runner.invoke(app, ["ood", cmd, "--model", "m", *extra, "--ants-mode", "near"])
    assert r.exit_code == 2 and "'near' is not one of 'ada', 'far_only', 'near_only'" in r.output, r.output
    r = runner.invoke(app, ["ood", cmd, "--model", "m", *extra, "--device", "tpu"])
    assert r.exit_code == 2 and "expected cpu, cuda, cuda:N or mps" in r.output, r.output


@pytest.mark.parametrize("which, content, says", [
    ("labels", b"\xff\xfeapple\n", "classes.txt: label file is not UTF-8 text"),
    ("labels", None, "classes.txt: no such label file"),
    ("neg", b"\xff\xfe\x00\x01", "neg.txt: word list is not UTF-8 text"),
    ("neg", b"noun\tcat\nverb\tdog\n", "neg.txt:2: part of speech must be 'noun' or 'adj', got 'verb'"),
    ("words", b"\x80\x81\n", "words.txt: word list is not UTF-8 text"),
])
def test_bad_label_and_word_files_are_one_line(setup, tmp_path, which, content, says):
    labels, neg, words = tmp_path / "classes.txt", tmp_path / "neg.txt", tmp_path / "words.txt"
    labels.write_text("apple\nleaf\n")
    neg.write_text("noun\tcar\n")
    words.write_text("thing\n")
    target = {"labels": labels, "neg": neg, "words": words}[which]
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    if which == "words":
        args = ["mine-labels", "--id-labels", str(labels), "--model", setup["model"], "--words", str(words),
                "--out", str(tmp_path / "nl.txt"), "--device", "cpu"]
    else:
        args = ["score", "--model", setup["model"], "--id-labels", str(labels), "--method", "neglabel",
                "--neg-labels", str(neg), "--source", str(setup["img"] / "id"), "--out", str(tmp_path / "s.csv"),
                "--device", "cpu"]
    r = runner.invoke(ood_app, args)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert says in r.output.strip().splitlines()[-1], r.output
