"""`ood bench --method a,b,c` in one pass, prompt templates and temperature from the CLI (recorded in the outputs),
and `ood metrics` recomputing metrics from a scores CSV."""

import json

import pytest
import torch
from typer.testing import CliRunner

from clip_ood.cli import ood_app
from clip_ood.lexicon import ID_TEMPLATE, PHOTO_TEMPLATE, NegativeLabels, check_template
from clip_ood.scorer import OODScorer

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, image_folders, tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    (d / "classes.txt").write_text("apple\nleaf\n")
    NegativeLabels([f"thing{i}" for i in range(12)] + ["shiny"], ["noun"] * 12 + ["adj"]).save(d / "neg.txt")
    return {"model": f"local-dir:{tiny_model_dir}", "dir": d, "img": image_folders}


def _ok(args):
    r = runner.invoke(ood_app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_method_default_templates_and_template_check(tiny_encoder):
    assert OODScorer(tiny_encoder, ["apple"], method="mcm", cache_dir=False).id_templates == (PHOTO_TEMPLATE,)
    neg = NegativeLabels(["x", "y"], ["noun", "noun"])
    sc = OODScorer(tiny_encoder, ["apple"], method="neglabel", negatives=neg, num_groups=1, cache_dir=False)
    assert sc.id_templates == (ID_TEMPLATE,) and sc.neg_templates is None
    # own negative templates: the negatives are the words through them (averaged)
    sc2 = OODScorer(tiny_encoder, ["apple"], method="neglabel", negatives=neg, num_groups=1, cache_dir=False,
                    neg_templates=["a photo of a {}.", "a {}."])
    from clip_ood.encoders import encode_labels

    want = encode_labels(tiny_encoder, ["x", "y"], ("a photo of a {}.", "a {}."), cache_dir=False)
    assert torch.allclose(sc2.neg_features, want)
    assert sc2.settings()["neg_templates"] == ["a photo of a {}.", "a {}."]
    for bad in ("a photo", "a {} and {}", "{label}", "a {x} {}"):
        with pytest.raises(ValueError, match="exactly one"):
            check_template(bad)
    assert check_template("itap of a {}.") == "itap of a {}."


def test_templates_and_temperature_from_the_cli(setup, tiny_encoder, tmp_path):
    d, model, img = setup["dir"], setup["model"], setup["img"]
    out = tmp_path / "s.csv"
    res = _ok(["score", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm", "--source",
               str(img / "id"), "--out", str(out), "--id-template", "itap of a {}.", "--id-template", "a {}.",
               "--temperature", "0.5", "--no-resume"])
    assert res["id_templates"] == ["itap of a {}.", "a {}."] and res["temperature"] == 0.5
    meta = json.loads((tmp_path / "s.csv.json").read_text())
    assert meta["id_templates"] == ["itap of a {}.", "a {}."] and meta["method"] == "mcm"
    # the CSV holds what a scorer with those settings gives
    import csv

    from clip_ood.data import load_image

    rows = list(csv.DictReader(open(out)))
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="mcm", id_templates=["itap of a {}.", "a {}."],
                   temperature=0.5, cache_dir=False)
    want = sc.score_images([load_image(r["path"]) for r in rows]).scores
    assert torch.allclose(torch.tensor([float(r["score"]) for r in rows]), want, atol=1e-5)
    default = _ok(["score", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm", "--source",
                   str(img / "id"), "--out", str(tmp_path / "d.csv")])
    assert default["id_templates"] == [PHOTO_TEMPLATE] and default["temperature"] == 1.0
    r = runner.invoke(ood_app, ["score", "--model", model, "--id-labels", str(d / "classes.txt"), "--source",
                                str(img / "id"), "--id-template", "a photo"])
    assert r.exit_code == 2 and "exactly one '{}'" in r.output


def test_bench_several_methods_in_one_pass(setup, monkeypatch, tmp_path):
    import clip_ood.encoders as E

    d, model, img = setup["dir"], setup["model"], setup["img"]
    calls = []
    real = E.encode_pil
    monkeypatch.setattr(E, "encode_pil", lambda enc, ims: calls.append(len(ims)) or real(enc, ims))
    base = ["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(img / "noise"), "--ood-dir",
            str(img / "dark"), "--neg-labels", str(d / "neg.txt"), "--describer", "scripted", "--batch", "8"]
    res = _ok([*base, "--method", "mcm,neglabel,ants", "--out", str(tmp_path / "all")])
    assert sum(calls) == 16 and len(calls) == 2  # 16 images encoded once, for all three methods
    assert set(res["methods"]) == {"mcm", "neglabel", "ants"}
    top = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert set(top["methods"]) == {"mcm", "neglabel", "ants"}
    assert (tmp_path / "all" / "metrics.csv").read_text().count("\n") == 4
    for m in ("mcm", "neglabel", "ants"):
        assert (tmp_path / "all" / m / "calibration.json").is_file() and (tmp_path / "all" / m / "roc_logfpr.png").is_file()
        assert json.loads((tmp_path / "all" / m / "metrics.json").read_text())["settings"]["method"] == m
    # the same figures as one method at a time (a stateless method's metrics do not depend on the stream order)
    for m in ("mcm", "neglabel"):
        one = _ok([*base, "--method", m, "--out", str(tmp_path / m)])
        assert one["average"] == pytest.approx(res["methods"][m], abs=1e-9)
    r = runner.invoke(ood_app, [*base, "--method", "mcm,nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_metrics_from_a_scores_csv(setup, tmp_path):
    model, img = setup["model"], setup["img"]
    _ok(["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(img / "noise"), "--method", "mcm",
         "--out", str(tmp_path / "b")])
    bench = json.loads((tmp_path / "b" / "metrics.json").read_text())
    res = _ok(["metrics", str(tmp_path / "b" / "scores.csv"), "--out", str(tmp_path / "m.json")])
    assert res["average"] == pytest.approx(bench["average"], abs=1e-5)  # scores.csv keeps 6 decimals
    assert json.loads((tmp_path / "m.json").read_text())["per_set"]["noise"]["n_ood"] == 4
    bad = {"nocol.csv": ("path,value\na,1\n", "no score, set column"),
           "nan.csv": ("set,score\nID,0.5\nx,abc\n", "nan.csv:3: score 'abc' is not a number"),
           "noid.csv": ("set,score\nA,0.5\nB,0.2\n", "no row with set 'ID' (sets: A, B"),
           "onlyid.csv": ("set,score\nID,0.5\n", "an OOD set is needed")}
    for name, (text, msg) in bad.items():
        (tmp_path / name).write_text(text)
        r = runner.invoke(ood_app, ["metrics", str(tmp_path / name)])
        assert r.exit_code == 1 and msg in r.output, (name, r.output)
    r = runner.invoke(ood_app, ["metrics", str(tmp_path / "missing.csv")])
    assert r.exit_code == 1 and "no such file" in r.output
    (tmp_path / "alt.csv").write_text("set,score\nin,0.9\nin,0.8\nout,0.1\nout,0.85\n")
    res = _ok(["metrics", str(tmp_path / "alt.csv"), "--id-set", "in"])
    assert res["per_set"]["out"]["auroc"] == pytest.approx(0.75)  # hand-checked: 3 of 4 pairs ordered
