"""ONNX export of ATSS and SegDecNet: onnxruntime results equal the PyTorch ones on the same images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detectors.atss.export import ATSSExport, OnnxDetector, export_detector, predict_images_onnx  # noqa: E402
from detectors.detect import load_detector, predict_images  # noqa: E402
from detectors.export import read_metadata  # noqa: E402
from detectors.segdec.export import OnnxSegDec, export_segdec, predict_segdec_onnx  # noqa: E402
from vision.cli import app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py

runner = CliRunner()
SCORE_THRESH = 0.005  # a 2-step model scores about 0.01: keep many candidates so NMS has work to do


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    r = runner.invoke(app, ["data", "make-digits", "--out", str(out), "--format", "yolo", "--n-train", "8",
                            "--n-val", "4", "--img-size", "96"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "exp"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--epochs", "1", "--backbone",
                            "resnet18", "--pretrained", "false", "--img-size", "96", "--batch", "4", "--fpn-channels",
                            "32", "--workers", "0"])
    assert r.exit_code == 0, r.output
    spec = json.loads((run / "detector.json").read_text())
    spec["kwargs"]["score_thresh"] = SCORE_THRESH
    (run / "detector.json").write_text(json.dumps(spec))
    return run


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = runner.invoke(app, ["detect", "export", "--weights", str(run), "--out", str(out)])  # the CLI command
    assert r.exit_code == 0 and "exported ->" in r.output, r.output
    return out


def test_cli_predict_with_an_onnx_file(onnx_file, digits, tmp_path):
    out = tmp_path / "pred"
    r = runner.invoke(app, ["detect", "predict", "--weights", str(onnx_file), "--source", str(digits / "images" / "val"),
                            "--out", str(out), "--conf", "0.0"])
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("*.json"))) == 4 and len(list(out.glob("*.jpg"))) == 4
    r = runner.invoke(app, ["detect", "export", "--weights", str(onnx_file.parent), "--format", "pt2", "--out",
                            str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "must end in .pt2" in r.output


@pytest.fixture(scope="module")
def images(digits) -> dict[str, list[np.ndarray]]:
    files = sorted((digits / "images" / "val").glob("*.jpg"))
    square = [np.asarray(Image.open(f).convert("RGB")) for f in files[:3]]
    wide = [np.asarray(Image.fromarray(a).resize((120, 80), Image.Resampling.BILINEAR)) for a in square]
    return {"96x96": square, "80x120": wide}


def _torch_predict(model, arrays):
    with torch.no_grad():
        out = model([torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255) for a in arrays])
    return [{k: v.numpy() for k, v in o.items()} for o in out]


def _assert_same(onnx_dets, torch_dets):
    """One-to-one matching (Hungarian on IoU): IoU >= 0.99, scores within 1e-3, equal labels. At the
    detections_per_img cut (a full list of 100), candidates whose scores tie to float precision may be kept by one
    runtime and dropped by the other: those within 1e-5 of the lowest kept score need no partner."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    assert len(onnx_dets) == len(torch_dets)
    for o, r in zip(onnx_dets, torch_dets, strict=True):
        assert o["boxes"].shape == r["boxes"].shape and len(r["scores"]) > 0
        assert o["labels"].dtype == np.int64 and o["boxes"].dtype == np.float32
        iou = box_iou(torch.from_numpy(o["boxes"]), torch.from_numpy(r["boxes"])).numpy()
        same = (o["labels"][:, None] == r["labels"][None, :]) & (np.abs(o["scores"][:, None] - r["scores"][None]) < 1e-3)
        rows, cols = linear_sum_assignment(-(iou * same))
        assert len(rows) == len(r["scores"])
        full = len(r["scores"]) >= 100
        tie = (r["scores"][cols] <= r["scores"].min() + 1e-5) if full else np.zeros(len(cols), bool)
        assert tie.sum() <= 10  # only a few candidates can sit on the cut
        firm = ~tie
        assert (iou[rows, cols][firm] >= 0.99).all()
        assert (o["labels"][rows][firm] == r["labels"][cols][firm]).all()
        assert np.abs(o["scores"][rows] - r["scores"][cols]).max() < 1e-3
        assert np.abs(o["scores"] - r["scores"]).max() < 1e-5  # in fact the same ranking, to float precision


def _assert_same_json(got: list[dict], want: list[dict]) -> None:
    """The JSON detections of two predict runs: a one-to-one matching with equal labels and class names,
    scores within 1e-4 and box corners within 0.02 px."""
    from scipy.optimize import linear_sum_assignment

    box_g, box_w = np.array([d["box"] for d in got]), np.array([d["box"] for d in want])
    dist = np.abs(box_g[:, None] - box_w[None]).max(-1)
    ok = ((dist <= 0.02)
          & (np.abs(np.array([d["score"] for d in got])[:, None] - np.array([d["score"] for d in want])[None]) <= 1e-4)
          & (np.array([d["label"] for d in got])[:, None] == np.array([d["label"] for d in want])[None]))
    rows, cols = linear_sum_assignment(-ok.astype(float))
    assert ok[rows, cols].all() and len(rows) == len(want)
    assert all(got[r]["class_name"] == want[c]["class_name"] for r, c in zip(rows, cols, strict=True))


def test_onnx_matches_pytorch_for_both_image_sizes_and_batches(run, onnx_file, images):
    model, _ = load_detector(run, "cpu")
    det = OnnxDetector(onnx_file, threads=1)
    assert det.providers == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in det.providers
    for size, arrays in images.items():
        ref = _torch_predict(model, arrays)  # batch 3 (a 96-px tiny model cannot run a batch of 1 in PyTorch:
        _assert_same(det.predict(arrays), ref)  # GroupNorm over its 1 x 1 P7 with one channel per group)
        singles = [det.predict([a])[0] for a in arrays]  # dynamic batch: 1 and 3 give the same detections
        _assert_same(singles, ref)
        assert all(len(d["scores"]) == model.detections_per_img for d in ref), size
        h, w = arrays[0].shape[:2]
        for d in singles:  # boxes are in the original image's coordinates
            assert d["boxes"][:, 0::2].max() <= w + 1e-3 and d["boxes"][:, 1::2].max() <= h + 1e-3
    mixed = [images["96x96"][0], images["80x120"][1]]  # padded together exactly as torchvision pads them
    _assert_same(det.predict(mixed), _torch_predict(model, mixed))
    assert det.predict([]) == []


def test_graph_is_general_in_batch_height_and_width(run, onnx_file):
    """The file runs any multiple-of-32 input (also levels of size 1 and sizes above the traced one)."""
    import onnxruntime as ort

    model, _ = load_detector(run, "cpu")
    wrapper = ATSSExport(model).eval()
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for b, h, w in [(2, 32, 64), (3, 64, 96), (2, 320, 160)]:
        x = torch.randn(b, 3, h, w)
        sizes = torch.tensor([[h - 7, w]] * b)
        got = sess.run(None, {"images": x.numpy(), "image_sizes": sizes.numpy()})
        with torch.no_grad():
            want = wrapper(x, sizes)
        assert [g.shape for g in got] == [(b, 100, 4), (b, 100), (b, 100), (b,)]
        np.testing.assert_array_equal(got[3], want[3].numpy())
        # random inputs give many equal scores: compare the detections ranked strictly above the last kept score
        np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-6)
        for i in range(b):
            cut = float(want[1][i, : int(want[3][i])].min()) + 1e-6
            o = {"boxes": got[0][i][got[1][i] > cut], "scores": got[1][i][got[1][i] > cut],
                 "labels": got[2][i][got[1][i] > cut]}
            keep = want[1][i] > cut
            r = {"boxes": want[0][i][keep].numpy(), "scores": want[1][i][keep].numpy(),
                 "labels": want[2][i][keep].numpy()}
            _assert_same([o], [r])


def test_metadata_round_trips(run, onnx_file):
    import onnx

    onnx.checker.check_model(str(onnx_file))
    model, spec = load_detector(run, "cpu")
    meta = read_metadata(onnx_file)
    assert meta["negvision_format"] == "negvision.onnx" and meta["format_version"] == "1" and meta["task"] == "detect"
    assert meta["classes"] == spec["classes"] and meta["img_size"] == 96 and meta["size_divisible"] == 32
    assert meta["mean"] == pytest.approx(list(model.transform.image_mean))
    assert meta["std"] == pytest.approx(list(model.transform.image_std))
    assert meta["score_thresh"] == pytest.approx(SCORE_THRESH) and meta["nms_thresh"] == pytest.approx(0.6)
    assert meta["detections_per_img"] == 100 and meta["nms"] is True and meta["half"] is False
    assert meta["source"] == str(run / "checkpoints" / "best" / "model.safetensors")
    assert meta["inputs"] == ["images", "image_sizes"]
    assert meta["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    det = OnnxDetector(onnx_file)
    assert det.meta == meta and det.classes == spec["classes"]
    sess_in = [(i.name, i.type) for i in det.session.get_inputs()]
    assert sess_in == [("images", "tensor(float)"), ("image_sizes", "tensor(int64)")]


def test_bad_files_give_one_line_errors_naming_them(onnx_file, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_file.read_bytes()[:5000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file at all")
    plain = tmp_path / "plain.onnx"  # a valid model that negvision did not write
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    for path in (cut, garbage, plain):
        for load in (OnnxDetector, OnnxSegDec, read_metadata):
            with pytest.raises(ValueError) as e:
                load(path)
            msg = str(e.value)
            assert str(path) in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match="no negvision metadata"):
        OnnxDetector(plain)
    with pytest.raises(ValueError, match="expected a SegDecNet"):
        OnnxSegDec(onnx_file)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxDetector(tmp_path / "missing.onnx")


def test_missing_onnxruntime_says_how_to_install(onnx_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'negvision\[export\]'"):
        OnnxDetector(onnx_file)


def test_predict_images_onnx_writes_what_predict_images_writes(run, onnx_file, digits, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((digits / "images" / "val").glob("*.jpg"))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    want = predict_images(run, src, tmp_path / "torch", score_thresh=0.0, batch=3, device="cpu")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        predict_images_onnx(onnx_file, src, tmp_path / "x", score_thresh=0.0, batch=3)
    got = predict_images_onnx(onnx_file, src, tmp_path / "onnx", score_thresh=0.0, batch=3, skip_bad=True)
    assert "broken.jpg" in (tmp_path / "onnx" / "skipped.txt").read_text()
    assert [Path(r["json"]).name for r in got] == [Path(r["json"]).name for r in want]
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in ("width", "height")} == {k: w[k] for k in ("width", "height")}
        assert Path(g["picture"]).is_file()
        assert json.loads(Path(g["json"]).read_text())["detections"] == g["detections"]
        assert len(g["detections"]) == len(w["detections"]) > 0
        # matched one-to-one, not by position: a barely trained model has near-tied scores whose order may swap
        _assert_same_json(g["detections"], w["detections"])


def test_raw_outputs_get_the_pytorch_post_processing(run, onnx_file, images):
    """An nms=False file's outputs go through ATSS.postprocess itself (here fed by the eager export wrapper)."""
    from torchvision.models.detection.transform import resize_boxes

    model, _ = load_detector(run, "cpu")
    det = OnnxDetector(onnx_file)
    raw = ATSSExport(model, nms=False).eval()
    for arrays in images.values():
        x, sizes, originals = det.preprocess(arrays)
        with torch.no_grad():
            outs = [t.numpy() for t in raw(torch.from_numpy(x))]
        dets = det._postprocess_raw(outs, sizes)
        got = [{"boxes": resize_boxes(d["boxes"], s, o).numpy(), "scores": d["scores"].numpy(),
                "labels": d["labels"].numpy()} for d, s, o in zip(dets, sizes, originals, strict=True)]
        _assert_same(got, _torch_predict(model, arrays))


@pytest.mark.slow  # two more exports (about 25 s on 2 CPU cores)
def test_raw_onnx_file_and_pt2_program(run, images, tmp_path):
    import detectors.export  # noqa: F401  (registers the NMS op a .pt2 program calls)

    model, _ = load_detector(run, "cpu")
    path = export_detector(run, tmp_path / "raw.onnx", nms=False)
    meta = read_metadata(path)
    assert meta["nms"] is False and meta["outputs"] == ["cls_logits", "box_deltas", "centerness", "anchors"]
    det = OnnxDetector(path, threads=1)
    assert [i.name for i in det.session.get_inputs()] == ["images"]
    assert [len(o.shape) for o in det.session.get_outputs()] == [3, 3, 2, 2]
    for arrays in images.values():
        _assert_same(det.predict(arrays), _torch_predict(model, arrays))

    pt2 = export_detector(run, tmp_path / "model.pt2")  # torch.export program: dynamic batch, fixed 96 x 96 input
    program = torch.export.load(pt2).module()
    x, sizes = torch.randn(2, 3, 96, 96), torch.tensor([[64, 96], [96, 96]])
    with torch.no_grad():
        for got, want in zip(program(x, sizes), ATSSExport(model)(x, sizes), strict=True):
            torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def segdec_run(tmp_path_factory) -> tuple[Path, Path]:
    from _settings import train_segdec

    from vision.data.defects import make_defects

    data = make_defects(tmp_path_factory.mktemp("defects") / "set", n_train=8, n_test=4, img_size=32, seed=0)
    run = tmp_path_factory.mktemp("segrun") / "run"
    train_segdec(data, run, epochs=1, batch=4, width=0.25, device="cpu", progress=False, eval_every=0, backbone="paper")
    return run, data / "test" / "images"


def test_segdec_export_matches_pytorch(segdec_run, tmp_path):
    from detectors.segdec.predict import predict_segdec
    from detectors.segdec.spec import load_segdec

    run, src = segdec_run
    path = export_segdec(run, tmp_path / "segdec.onnx")
    net = OnnxSegDec(path, threads=1)
    meta = net.meta
    assert meta["task"] == "segdec" and meta["img_size"] == [32, 32] and meta["channels"] == 1
    val_thr = json.loads((run / "segdec.json").read_text())["threshold"]  # chosen on validation, not on the test
    assert meta["threshold"] == pytest.approx(val_thr) and net.threshold == pytest.approx(val_thr)
    assert [o.name for o in net.session.get_outputs()] == ["decision_logits", "seg_logits"]
    model, _ = load_segdec(run, "cpu")
    ims = [Image.open(f).convert("L") for f in sorted(src.glob("*.png"))]
    x = net.preprocess(ims)
    assert x.shape == (len(ims), 1, 32, 32)
    dec, seg = net.run(x)
    with torch.no_grad():
        want_dec, want_seg = model(torch.from_numpy(x))
    np.testing.assert_allclose(dec, want_dec.numpy(), atol=1e-4)
    np.testing.assert_allclose(seg, want_seg.numpy(), atol=1e-4)
    assert seg.shape == (len(ims), 1, 4, 4)
    dec1, _ = net.run(x[:1])  # dynamic batch
    np.testing.assert_allclose(dec1, want_dec.numpy()[:1], atol=1e-4)
    got = predict_segdec_onnx(path, src, tmp_path / "onnx")
    want = predict_segdec(run, src, tmp_path / "torch", device="cpu")
    assert [g["probability"] for g in got] == pytest.approx([w["probability"] for w in want], abs=1e-4)
    thr = net.threshold  # the decisions agree wherever the probability is not within float noise of the threshold
    assert all(g["defective"] == w["defective"] for g, w in zip(got, want, strict=True)
               if abs(w["probability"] - thr) > 1e-3)
    assert (tmp_path / "onnx" / "predictions.csv").is_file() and (tmp_path / "onnx" / "masks").is_dir()
