"""Label issues after training (detectors.label_issues): cleanlab's label and prediction formats checked by hand on a
1-image folder, its scores on hand-made predictions, a planted wrong class and a deleted box ranked at the top by a
detector trained on the clean copy, ``detect eval --label-issues`` (with and without ``--folds``) and the data
report section."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from detectors.label_issues import (
    ISSUE_TYPES,
    LabelIssueConfig,
    ScoreCalibration,
    cleanlab_labels,
    cleanlab_predictions,
    fold_of,
    fold_settings,
    issue_types,
    label_quality,
    match_predictions,
    rank_label_issues,
)
from vision.cli import app
from vision.data import load_detection_dataset, make_digits

runner = CliRunner()


# ----------------------------------------------------------------------------------------------- by hand
def one_image_folder(root: Path) -> Path:
    """A COCO folder: one 64 x 48 image, boxes [4, 6, 10, 12] (class a) and [20, 10, 8, 8] (class c), xywh."""
    (root / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (64, 48), (90, 120, 150)).save(root / "images" / "train" / "one.png")
    coco = {"images": [{"id": 7, "file_name": "one.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [4, 6, 10, 12], "area": 120, "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 10, 8, 8], "area": 64, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return root


def test_labels_in_cleanlab_format_by_hand(tmp_path):
    ds = load_detection_dataset(one_image_folder(tmp_path), "train", progress=False)
    (lab,) = cleanlab_labels(ds)
    assert set(lab) == {"bboxes", "labels", "image_name"}
    assert lab["bboxes"].dtype == np.float32 and lab["labels"].dtype == np.int64
    np.testing.assert_array_equal(lab["bboxes"], [[4, 6, 14, 18], [20, 10, 28, 18]])  # xywh -> xyxy pixels
    assert lab["labels"].tolist() == [0, 2]  # 0-based, category ids 1 and 3
    assert lab["image_name"].endswith("one.png")


def test_predictions_in_cleanlab_format_by_hand():
    pred = {"boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]),
            "scores": torch.tensor([0.9, 0.5, 0.7]), "labels": torch.tensor([2, 0, 2])}
    (per_class,) = cleanlab_predictions([pred], 3)
    assert len(per_class) == 3 and all(a.dtype == np.float32 and a.shape[1] == 5 for a in per_class)
    np.testing.assert_allclose(per_class[0], [[5, 6, 7, 8, 0.5]])
    assert per_class[1].shape == (0, 5)
    np.testing.assert_allclose(per_class[2], [[1, 2, 3, 4, 0.9], [9, 10, 11, 12, 0.7]])  # the detector's order
    (cal,) = cleanlab_predictions([pred], 3, calibration=lambda s: np.asarray(s) / 2)
    np.testing.assert_allclose(cal[2][:, 4], [0.45, 0.35], rtol=1e-6)
    (kept,) = cleanlab_predictions([pred], 3, min_score=0.6)  # below it: left out
    assert [len(a) for a in kept] == [0, 0, 2]
    (empty,) = cleanlab_predictions([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                      "labels": torch.zeros(0, dtype=torch.long)}], 3)
    assert [a.shape for a in empty] == [(0, 5)] * 3
    with pytest.raises(ValueError, match="class 2"):
        cleanlab_predictions([pred], 2)


def test_matching_and_calibration_by_hand():
    labels = [{"bboxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([0, 1])}]
    # class 0 on box 0 (0.9, correct), again lower (0.8, duplicate), class 1 on box 0 (0.7, wrong class),
    # class 1 on box 1 shifted to IoU 0.47 (0.6: below 0.5), class 1 on box 1 (0.5, correct)
    preds = [[np.array([[0, 0, 10, 10, 0.9], [0, 0, 10, 10, 0.8]], np.float32),
              np.array([[0, 0, 10, 10, 0.7], [24, 20, 34, 30, 0.6], [20, 20, 30, 30, 0.5]], np.float32)]]
    scores, correct = match_predictions(preds, labels)
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert correct.tolist() == [True, False, False, False, True]
    cal = ScoreCalibration(np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9]), np.array([0, 0, 1, 0, 1, 1], bool))
    p = cal(np.array([0.05, 0.3, 0.5, 0.95]))
    assert np.all(np.diff(p) > 0) and cal.a > 0  # monotone, keeps the order of the scores
    assert 0 <= p[0] < 0.5 < p[-1] <= 1
    assert ScoreCalibration(np.array([0.3, 0.4]), np.zeros(2, bool))(np.array([0.9])).tolist() == [0.0]


def test_cleanlab_scores_name_each_issue_type():
    """One label box of class 0 at [10, 10, 40, 40] per image; the predictions make each image one issue type."""
    box = np.array([[10, 10, 40, 40]], np.float32)
    labels = [{"bboxes": box, "labels": np.array([0])} for _ in range(6)]

    def pred(*rows):  # rows: (x1, y1, x2, y2, score, class)
        return {"boxes": torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([r[4] for r in rows]), "labels": torch.tensor([r[5] for r in rows])}

    preds = [pred((10, 10, 40, 40, 0.99, 0)), pred((11, 10, 40, 41, 0.98, 0)), pred((10, 11, 41, 40, 0.99, 0)),
             pred((10, 10, 40, 40, 0.99, 1)),  # wrong class
             pred((10, 10, 40, 40, 0.99, 0), (60, 60, 90, 90, 0.99, 1)),  # a confident object without a label
             pred((25, 10, 55, 40, 0.99, 0))]  # the box is half a width off
    q = label_quality(labels, cleanlab_predictions(preds, 2))
    assert q.score.shape == (6,) and np.all((0 <= q.score) & (q.score <= 1))
    assert set(np.argsort(q.score)[:3]) == {3, 4, 5} and q.score[:3].min() > 0.9
    assert issue_types(bool(q.issue[3]), {t: q.type_scores[t][3] for t in ISSUE_TYPES}) == ["swap"]
    assert issue_types(bool(q.issue[4]), {t: q.type_scores[t][4] for t in ISSUE_TYPES}) == ["overlooked"]
    assert issue_types(bool(q.issue[5]), {t: q.type_scores[t][5] for t in ISSUE_TYPES}) == ["badloc"]
    assert issue_types(False, {t: q.type_scores[t][0] for t in ISSUE_TYPES}) == []
    assert issue_types(True, {"overlooked": 0.9, "swap": 0.7, "badloc": 0.8}) == ["swap"]  # flagged: its lowest
    assert len(q.box_scores["overlooked"][4]) == 2 and np.isnan(q.box_scores["overlooked"][4][0])


def test_fold_settings_repeat_the_run(tmp_path):
    """The fold trainings' settings come from the run: model (detector.json), schedule (config.json), augmentation
    (config.yaml, the command's options)."""
    from detectors.detect import model_spec

    spec = model_spec("atss", 3, ["a", "b", "c"], "resnet18", False, 96, fpn_channels=32, num_convs=1)
    (tmp_path / "detector.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"train": {"epochs": 7, "lr": 0.005, "optimizer": "adamw",
                                                                "batch_size": 2, "seed": 3, "out_dir": "elsewhere",
                                                                "device": "cuda", "milestones": [0.5, 0.9]}}))
    (tmp_path / "config.yaml").write_text("hflip: 0.3\nscale: 0.6,1.4\ncolor_jitter: 0.1\nno_augment: false\n")
    det, train, notes = fold_settings(tmp_path, spec)
    assert (det.model, det.backbone, det.pretrained, det.img_size) == ("atss", "resnet18", False, 96)
    assert det.model_kwargs == {"fpn_channels": 32, "num_convs": 1, "freeze_bn": False}
    assert det.augment == {"hflip": 0.3, "scale": (0.6, 1.4), "color_jitter": 0.1}
    assert (train.epochs, train.lr, train.optimizer, train.batch_size, train.seed) == (7, 0.005, "adamw", 2, 3)
    assert train.milestones == (0.5, 0.9) and train.out_dir == "" and train.device is None  # set by the fold's run
    assert notes == []
    (tmp_path / "config.yaml").write_text("no_augment: true\n")
    assert fold_settings(tmp_path, spec)[0].augment is False
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "config.json").unlink()
    det, train, notes = fold_settings(tmp_path, spec)
    assert det.augment is True and train.epochs is None and len(notes) == 2  # the defaults, said


def test_folds_are_balanced_and_seeded():
    f = fold_of(11, 3, seed=0)
    assert sorted(np.bincount(f).tolist()) == [3, 4, 4]
    assert f.tolist() == fold_of(11, 3, seed=0).tolist() != fold_of(11, 3, seed=1).tolist()


# ----------------------------------------------------------------------------------------------- planted errors
N_TRAIN, IMG = 40, 128
# ATSS on the offline ImageNet EfficientNet-Lite0, small head, AdamW: on 40 images of 1-2 digits it learns the
# training images well enough in 24 epochs that its correct boxes outscore its mistakes (~0.5 vs ~0.25)
TRAIN = dict(epochs=24, batch_size=4, lr=1e-3, optimizer="adamw", warmup_steps=10, seed=0,
             clip_grad_norm=10.0)
MODEL = dict(fpn_channels=64, num_convs=2)


def plant(data: Path, run: Path) -> dict[str, str]:
    """Give one training box of ``data`` another class and delete another box, in place; returns file name ->
    "swap" / "delete". The two boxes are those the model ``run`` (trained on the clean labels) finds most surely (a
    label-error finder can only point at objects the model has learnt), each alone in its image (no box touches it)."""
    from torchvision.ops import box_iou

    from detectors.detect import load_detector, run_inference

    ds = load_detection_dataset(data, "train", progress=False)
    model, _ = load_detector(run, "cpu")
    preds = run_inference(model, ds)
    cands = []
    for i, p in enumerate(preds):
        boxes, labels = ds.annotations(i)
        touch = box_iou(torch.as_tensor(boxes), torch.as_tensor(boxes)).numpy() - np.eye(len(labels))
        iou = box_iou(torch.as_tensor(boxes), p["boxes"]).numpy()
        for j in range(len(labels)):
            hit = (iou[j] >= 0.5) & (p["labels"].numpy() == labels[j])
            if hit.any() and touch[j].max(initial=0.0) <= 0:
                cands.append((float(p["scores"].numpy()[hit].max()), i, j))
    cands.sort(reverse=True)
    swap = cands[0]
    delete = next(c for c in cands if c[1] != swap[1])
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ids = [im["id"] for im in coco["images"]]  # the reader keeps the file's image order
    swapped = by_image[ids[swap[1]]][swap[2]]
    swapped["category_id"] = swapped["category_id"] % 10 + 1  # digit d -> d + 1
    deleted = by_image[ids[delete[1]]][delete[2]]
    coco["annotations"] = [a for a in coco["annotations"] if a is not deleted]
    path.write_text(json.dumps(coco))
    return {ds.image_paths[swap[1]].name: "swap", ds.image_paths[delete[1]].name: "delete"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, one_thread):
    """(clean copy, the training folder with the planted errors, the run trained on it before they were planted,
    planted file -> kind)."""
    from detectors.detect import DetectConfig, train_detector
    from vision.engine import RunOptions, TrainConfig

    root = tmp_path_factory.mktemp("label_issues")
    data = make_digits(root / "data", format="coco", n_train=N_TRAIN, n_val=8, img_size=IMG, seed=0, max_objects=2)
    # val_split: a split the folder lacks, so the run trains without evaluating (the tests evaluate)
    summary = train_detector(data, DetectConfig(img_size=IMG, augment=False, val_split="none",
                                                model_kwargs=dict(MODEL)),
                             TrainConfig(**TRAIN), RunOptions(out=root / "run", progress=False, device="cpu"))
    run = Path(summary["out"])
    shutil.copytree(data, root / "clean")
    return root / "clean", data, run, plant(data, run)


def rank_of(res, name: str) -> dict:
    return next(r for r in res.rows if Path(r["file"]).name == name)


@pytest.mark.slow
def test_planted_errors_rank_at_the_top(planted, tmp_path):
    clean, noisy, run, kinds = planted
    cfg = LabelIssueConfig(splits=("train",), top=4, device="cpu", progress=False)
    res = rank_label_issues(noisy, run, tmp_path / "noisy", cfg)
    top = max(1, N_TRAIN // 10)  # the top 10 %
    for name, kind in kinds.items():
        row = rank_of(res, name)
        assert row["rank"] <= top, (name, kind, row, res.rows[:top])
        assert row["issue"], row  # flagged by cleanlab's find_label_issues
        assert row["types"][0] == ("swap" if kind == "swap" else "overlooked"), row
    swap = rank_of(res, next(n for n, k in kinds.items() if k == "swap"))["suspects"][0]
    assert swap["type"] == "swap" and int(swap["predicted"]) == (int(swap["label"]) - 1) % 10  # the true digit
    assert res.saw == {"train": True} and "trained on these images" in res.sources["train"]
    # the control: the same images with their true labels are not among the flagged (the copy is another folder)
    ok = rank_label_issues(clean, run, None, cfg)
    assert ok.saw == {"train": False} and "trained on another folder" in ok.sources["train"]
    for name in kinds:
        assert not rank_of(ok, name)["issue"] and rank_of(ok, name)["rank"] > top, rank_of(ok, name)
    # files: the ranked list (JSON + CSV), the pictures of the top 4
    doc = json.loads((tmp_path / "noisy" / "label_issues.json").read_text())
    assert [r["rank"] for r in doc["images"]] == list(range(1, N_TRAIN + 1))
    assert doc["calibration"]["train"]["a"] > 0 and doc["saw"] == {"train": True}
    with open(tmp_path / "noisy" / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_TRAIN and {Path(rows[0]["file"]).name, Path(rows[1]["file"]).name} == set(kinds)
    pics = sorted((tmp_path / "noisy" / "pictures").glob("*.jpg"))
    assert len(pics) == 4
    with Image.open(pics[0]) as im:
        assert im.width > 2 * 300  # label | prediction, each at least 320 px wide


@pytest.mark.slow
def test_eval_cli_label_issues(planted, tmp_path):
    _, noisy, run, kinds = planted
    r = runner.invoke(app, ["detect", "eval", "--weights", str(run), "--data", str(noisy), "--label-issues",
                            "--top", "3", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "AP50" in r.output and "flagged by cleanlab" in r.output
    assert "train: predicted by the given model, which trained on these images" in r.output
    assert "val: predicted by the given model, which did not train on these images" in r.output
    lines = [ln for ln in r.output.splitlines() if ln.lstrip()[:2] in ("1*", "2*")]
    assert len(lines) == 2 and {n for n in kinds if any(n in ln for ln in lines)} == set(kinds), r.output
    folder = tmp_path / "ev" / "label_issues"
    with open(folder / "label_issues.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == N_TRAIN + 8  # train and val ranked together
    assert len(list((folder / "pictures").glob("*.jpg"))) == 3


@pytest.mark.slow
def test_report_section(planted, tmp_path):
    from vision.data.report import make_report

    _, noisy, run, kinds = planted
    res = make_report(noisy, tmp_path / "rep", img_size=IMG, progress=False, options={"weights": str(run)})
    assert "label_issues" in res["sections"] and not res["notes"], res["notes"]
    problems = res["sections"]["label_issues"]
    assert len(problems) >= 2 and all(any(n in p for p in problems[:2]) for n in kinds), problems
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    sec = doc["sections"]["label_issues"]
    assert sec["figures"]["saw"]["train"] is True and doc["options"]["weights"] == str(run)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Label issues after training" in html and "trained on these images" in html
    assert html.count('<figure class="pair"><img src="data:image/jpeg;base64,') == 12
    assert (tmp_path / "rep" / "label_issues" / "label_issues.csv").is_file()
    # the CLI passes --weights through; without it the section is absent
    r = runner.invoke(app, ["data", "report", "--data", str(noisy), "--out", str(tmp_path / "rep2"), "--img-size",
                            str(IMG), "--weights", str(run)])
    assert r.exit_code == 0, r.output
    assert "Label issues after training" in r.output
    plain = make_report(noisy, tmp_path / "rep3", img_size=IMG, progress=False)
    assert "label_issues" not in plain["sections"]


# ----------------------------------------------------------------------------------------------- cross-fitting
TINY = ["--backbone", "resnet18", "--pretrained", "false", "--img-size", "64", "--batch", "4", "--fpn-channels", "32",
        "--workers", "0", "--epochs", "1", "--no-augment"]


def test_eval_cli_folds_cross_fits_the_training_split(tmp_path, one_thread):
    data = make_digits(tmp_path / "d", format="yolo", n_train=8, n_val=2, img_size=64, seed=0, max_objects=2)
    r = runner.invoke(app, ["detect", "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["detect", "eval", "--weights", str(tmp_path / "run"), "--data", str(data),
                            "--label-issues", "--folds", "2", "--top", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "train: predicted by cross-fitted: 2 models" in r.output
    assert "cost: --folds 2: 2 trainings" in r.output
    folder = tmp_path / "run" / "label_issues"  # no --out: beside the model
    doc = json.loads((folder / "label_issues.json").read_text())
    assert doc["folds"] == 2 and doc["saw"] == {"train": False, "val": False} and len(doc["fold_runs"]) == 2
    assert {r["predicted_by"] for r in doc["images"] if r["split"] == "train"} == {"fold 0", "fold 1"}
    for run in doc["fold_runs"]:  # each fold run trained on the other fold, with the run's settings
        spec = json.loads((Path(run) / "detector.json").read_text())
        assert spec["kwargs"]["backbone"] == "resnet18" and spec["kwargs"]["min_size"] == 64
        cfg = json.loads((Path(run) / "config.json").read_text())
        assert cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == 4
        coco = json.loads((Path(run).parent / "annotations" / "instances_train.json").read_text())
        assert len(coco["images"]) == 4 and all(Path(im["file_name"]).is_absolute() for im in coco["images"])
    trained = [{im["file_name"] for im in json.loads((Path(run).parent / "annotations" / "instances_train.json")
                                                      .read_text())["images"]} for run in doc["fold_runs"]]
    assert not trained[0] & trained[1]  # with 2 folds each model trained on the fold the other one predicts
    # usage errors
    r = runner.invoke(app, ["detect", "eval", "--weights", str(tmp_path / "run"), "--data", str(data),
                            "--label-issues", "--folds", "1"])
    assert r.exit_code == 2 and "--folds 1" in r.output
    r = runner.invoke(app, ["detect", "eval", "--weights", str(tmp_path / "run"), "--data", str(data), "--folds", "2"])
    assert r.exit_code == 2 and "--label-issues" in r.output
    r = runner.invoke(app, ["data", "report", "--data", str(data), "--weights", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "error: --weights" in r.output and len(r.output.strip().splitlines()) == 1
