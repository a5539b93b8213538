"""End to end: make-captions, train coop and dcar through the engine, eval table and examples picture (tiny random
CLIP)."""

import csv
import json

from PIL import Image
from typer.testing import CliRunner

from clip_ood.dcar.cli import retrieval_app
from clip_ood.plots import retrieval_examples_size


def test_cli_end_to_end(tmp_path, tiny_model_dir):
    run = CliRunner()
    r = run.invoke(retrieval_app, ["make-captions", "--out", str(tmp_path / "d"), "--n-train", "24",
                                   "--n-test", "12"])
    assert r.exit_code == 0, r.output
    model = f"local-dir:{tiny_model_dir}"
    train, test = str(tmp_path / "d" / "train.csv"), str(tmp_path / "d" / "test.csv")
    for method in ("coop", "dcar"):
        out = tmp_path / method
        extra = ["--lambda-attr", "0.5"] if method == "dcar" else []  # the attribute term is off by default
        r = run.invoke(retrieval_app, ["train", "--model", model, "--data", train, "--val-data", test,
                                       "--method", method, "--out", str(out), "--epochs", "1",
                                       "--batch-size", "8", "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        cfg = json.loads((out / "prompts.json").read_text())
        assert cfg["method"] == method and (cfg["n_vis"] > 0) == (method == "dcar")
        assert (out / "summary.json").is_file() and (out / "log.csv").is_file()
        if method == "dcar":
            assert len(cfg["attr_vocab"]) > 0 and cfg["attr_history"]
        r = run.invoke(retrieval_app, ["eval", "--model", model, "--prompts", str(out), "--data", test,
                                       "--device", "cpu", "--json", str(tmp_path / f"{method}.json")])
        assert r.exit_code == 0, r.output
        assert "image->text" in r.output and "text->image" in r.output and method in r.output
    # top5_examples.jpg next to --json; without --json into the --prompts folder; --examples 0: none
    n_img, n_txt = 12, len({row["caption"] for row in csv.DictReader(open(test))})
    with Image.open(tmp_path / "top5_examples.jpg") as im:
        assert im.format == "JPEG" and im.size == retrieval_examples_size(n_img, n_txt, n=6, k=5)
    assert not (tmp_path / "coop" / "top5_examples.jpg").exists()
    r = run.invoke(retrieval_app, ["eval", "--model", model, "--prompts", str(tmp_path / "coop"), "--data", test,
                                   "--device", "cpu", "--examples", "2"])
    assert r.exit_code == 0 and "examples written to" in r.output
    with Image.open(tmp_path / "coop" / "top5_examples.jpg") as im:
        assert im.size == retrieval_examples_size(n_img, n_txt, n=2, k=5)
    r = run.invoke(retrieval_app, ["eval", "--model", model, "--prompts", str(tmp_path / "dcar"), "--data", test,
                                   "--device", "cpu", "--examples", "0"])
    assert r.exit_code == 0 and not (tmp_path / "dcar" / "top5_examples.jpg").exists()
    r = run.invoke(retrieval_app, ["eval", "--model", model, "--data", test, "--device", "cpu"])
    assert r.exit_code == 0 and "zero-shot" in r.output and "top5_examples.jpg not written" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption,category,attributes\nmissing.png,a cat,cat,\n")
    r = run.invoke(retrieval_app, ["eval", "--model", model, "--data", str(bad), "--device", "cpu"])
    assert r.exit_code == 1 and "line 2" in r.output


def _summary_steps(run) -> int:
    return json.loads((run / "summary.json").read_text())["steps"]


def test_train_config_yaml_resume_and_run_folders(tmp_path, tiny_model_dir):
    import yaml

    from vision.cli import app

    run = CliRunner()
    r = run.invoke(app, ["retrieval", "make-captions", "--out", str(tmp_path / "d"), "--n-train", "16",
                         "--n-test", "4"])
    assert r.exit_code == 0, r.output
    args = ["retrieval", "train", "--model", f"local-dir:{tiny_model_dir}", "--data", str(tmp_path / "d" / "train.csv"),
            "--method", "coop", "--batch", "8", "--device", "cpu", "--workers", "0"]
    out = tmp_path / "r"
    r = run.invoke(app, [*args, "--max-steps", "1", "--lr", "0.001", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _summary_steps(out) == 1 and (out / "prompts.safetensors").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "coop" and cfg["max_steps"] == 1 and cfg["lr"] == 0.001 and cfg["amp"] == "auto"
    assert cfg["batch"] == 8 and "resume" not in cfg and "config" not in cfg
    # replay the run from its config.yaml into another folder; command-line options win
    cfg["out"] = str(tmp_path / "b")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    r = run.invoke(app, ["retrieval", "train", "--config", str(tmp_path / "b.yaml"), "--seed", "5"])
    assert r.exit_code == 0, r.output
    replay = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in replay.items() if k != "seed"} == {k: v for k, v in cfg.items() if k != "seed"}
    assert replay["seed"] == 5 and json.loads((tmp_path / "b" / "config.json").read_text())["train"]["lr"] == 0.001
    # bare --resume continues OUT's newest checkpoint; --resume PATH that checkpoint folder
    r = run.invoke(app, [*args, "--max-steps", "2", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert _summary_steps(out) == 2 and (out / "config.resumed.yaml").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 1
    r = run.invoke(app, [*args, "--max-steps", "3", "--out", str(out), "--resume", str(out / "checkpoints" / "last")])
    assert r.exit_code == 0, r.output
    assert _summary_steps(out) == 3
    r = run.invoke(app, [*args, "--out", str(tmp_path / "fresh"), "--resume"])
    assert r.exit_code == 1 and "holds no checkpoints" in r.output
    # a new run into a used folder goes to NAME2; --exist-ok reuses it from scratch
    r = run.invoke(app, [*args, "--max-steps", "1", "--out", str(out)])
    assert r.exit_code == 0 and f"prompts written to {tmp_path / 'r2'}" in r.output, r.output
    r = run.invoke(app, [*args, "--max-steps", "1", "--out", str(out), "--exist-ok"])
    assert r.exit_code == 0, r.output
    assert _summary_steps(out) == 1 and not (tmp_path / "r3").exists()


def test_train_wrong_choices_exit_2_listing_the_allowed_values(tmp_path):
    from vision.cli import app

    base = ["retrieval", "train", "--model", "m", "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, [*base, "--amp", "half"])
    assert r.exit_code == 2 and "'half' is not one of 'auto', 'no', 'fp16', 'bf16'" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--method", "clip"])
    assert r.exit_code == 2 and "'clip' is not one of 'dcar', 'coop'" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--device", "gpu0"])
    assert r.exit_code == 2 and "expected cpu, cuda, cuda:N or mps" in r.output
    assert not (tmp_path / "o").exists()
