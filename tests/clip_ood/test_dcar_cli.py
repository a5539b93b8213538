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
        r = run.invoke(retrieval_app, ["train", "--model", model, "--data", train, "--val-data", test,
                                       "--method", method, "--out", str(out), "--epochs", "1",
                                       "--batch-size", "8", "--device", "cpu"])
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
