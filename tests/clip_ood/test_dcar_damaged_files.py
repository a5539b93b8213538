"""Damaged files on the retrieval path: prompts written by `retrieval train` cut short or edited by hand, and a
truncated local CLIP checkpoint, each give one error line naming the file (exit 1), never a traceback."""

import json

import pytest
from typer.testing import CliRunner

from clip_ood.dcar.cli import retrieval_app

run = CliRunner()


@pytest.fixture(scope="module")
def coop_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dcar_damaged")
    r = run.invoke(retrieval_app, ["make-captions", "--out", str(root / "d"), "--n-train", "12", "--n-test", "6"])
    assert r.exit_code == 0, r.output
    r = run.invoke(retrieval_app, ["train", "--model", f"local-dir:{tiny_model_dir}", "--data",
                                   str(root / "d" / "train.csv"), "--method", "coop", "--out", str(root / "coop"),
                                   "--max-steps", "1", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root


def _copy_run(coop_run, tmp_path):
    import shutil

    dst = tmp_path / "coop"
    shutil.copytree(coop_run / "coop", dst)
    return dst


def _eval(model, prompts, data):
    return run.invoke(retrieval_app, ["eval", "--model", model, "--prompts", str(prompts), "--data", str(data),
                                      "--device", "cpu", "--examples", "0"])


@pytest.mark.parametrize("damage,file,says", [
    ("json_cut", "prompts.json", "not valid JSON"),
    ("json_key", "prompts.json", "lacks 'categories'"),
    ("weights_cut", "prompts.safetensors", "prompts.safetensors"),
    ("weights_missing", "prompts.safetensors", "not found"),
])
def test_damaged_prompts_are_one_line_naming_the_file(coop_run, tiny_model_dir, tmp_path, damage, file, says):
    prompts = _copy_run(coop_run, tmp_path)
    f = prompts / file
    if damage == "json_cut":
        f.write_text(f.read_text()[:20])
    elif damage == "json_key":
        cfg = json.loads(f.read_text())
        del cfg["categories"]
        f.write_text(json.dumps(cfg))
    elif damage == "weights_cut":
        f.write_bytes(f.read_bytes()[:-40])
    else:
        f.unlink()
    r = _eval(f"local-dir:{tiny_model_dir}", prompts, coop_run / "d" / "test.csv")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    last = r.output.strip().splitlines()[-1]
    assert str(f) in last and says in last, r.output


def test_truncated_local_clip_checkpoint_names_the_file(coop_run, tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "clip"
    shutil.copytree(tiny_model_dir, model)
    w = model / "open_clip_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = run.invoke(retrieval_app, ["eval", "--model", f"local-dir:{model}", "--data",
                                   str(coop_run / "d" / "test.csv"), "--device", "cpu", "--examples", "0"])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)
    assert "open_clip_model.safetensors" in r.output.strip().splitlines()[-1], r.output


@pytest.mark.parametrize("content,says", [
    (b"\x80\x02garbage that is not a pickle", "cannot load these weights"),
    (b"PK\x03\x04 cut off after the first zip header", "broken zip archive"),
    (b"", "empty file"),
])
def test_damaged_pretrained_file_is_a_value_error_naming_it(tiny_encoder, tmp_path, content, says):
    from clip_ood.encoders import load_encoder

    f = tmp_path / "clip_weights.pt"
    f.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        load_encoder("negvision-tiny-test", pretrained=str(f), device="cpu")
    assert str(f) in str(exc.value) and says in str(exc.value)


def test_local_dir_missing_folder_or_bad_config(tmp_path):
    from clip_ood.encoders import load_encoder

    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_encoder(f"local-dir:{tmp_path / 'nope'}", device="cpu")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json: not found"):
        load_encoder(f"local-dir:{tmp_path / 'm'}", device="cpu")
    (tmp_path / "m" / "open_clip_config.json").write_text('{"model_cfg": ')
    with pytest.raises(ValueError, match="open_clip_config.json: not valid JSON"):
        load_encoder(f"local-dir:{tmp_path / 'm'}", device="cpu")


def test_unreadable_training_image_stops_before_training_or_is_skipped(coop_run, tiny_model_dir, tmp_path):
    import csv
    import shutil

    data = tmp_path / "d"
    shutil.copytree(coop_run / "d", data)
    rows = list(csv.DictReader(open(data / "train.csv")))
    broken = data / rows[1]["image"]
    broken.write_bytes(broken.read_bytes()[:60])  # a cut-off copy
    args = ["train", "--model", f"local-dir:{tiny_model_dir}", "--data", str(data / "train.csv"), "--method",
            "coop", "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--device", "cpu"]
    r = run.invoke(retrieval_app, args)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "1 unreadable image(s)" in r.output and f"line 3: {broken}" in r.output and "--skip-bad" in r.output
    r = run.invoke(retrieval_app, [*args, "--skip-bad"])
    assert r.exit_code == 0, r.output
    # the first attempt stopped before making the run folder; the file left out is listed in the run's skipped.txt
    skipped = (tmp_path / "run" / "skipped.txt").read_text()
    assert skipped.startswith("[train] ") and str(broken) in skipped and not (tmp_path / "run2").exists()
    r = run.invoke(retrieval_app, ["eval", "--model", f"local-dir:{tiny_model_dir}", "--data",
                                   str(data / "train.csv"), "--device", "cpu", "--examples", "0"])
    assert r.exit_code == 1 and f"line 3: {broken}" in r.output
