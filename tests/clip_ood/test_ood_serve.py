"""Calibration (``ood bench`` writes it, ``ood serve`` / ``ood score`` use it and refuse a foreign one), the ``ood
serve`` options (keys, warnings, refused combinations) with uvicorn stubbed, and a real ``--workers 2`` server."""

import asyncio
import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clip_ood.calibration import (
    CalibrationError,
    check_calibration,
    make_calibration,
    model_identity,
    read_calibration,
    write_calibration,
)
from clip_ood.cli import ood_app
from clip_ood.lexicon import NegativeLabels
from clip_ood.scorer import OODScorer

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, image_folders, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    (d / "classes.txt").write_text("apple\nleaf\n")
    return {"model": f"local-dir:{tiny_model_dir}", "dir": d, "img": image_folders}


class _Captured:
    app = None

    def __call__(self, app, **kw):
        self.app, self.kw = app, kw


@pytest.fixture
def no_uvicorn(monkeypatch):
    cap = _Captured()
    monkeypatch.setattr("uvicorn.run", cap)
    return cap


def test_calibration_threshold_is_the_fpr95_point(tiny_encoder):
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="mcm", cache_dir=False)
    scores = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    cal = make_calibration(sc, scores)  # keep ceil(0.95 * 10) = 10 of them: the lowest is the threshold
    assert cal["threshold"] == pytest.approx(0.1) and cal["tpr"] == 0.95 and cal["n_id"] == 10
    assert make_calibration(sc, scores, tpr=0.8)["threshold"] == pytest.approx(0.3)  # keep 8: 0.3 .. 1.0
    assert cal["method"] == "mcm" and cal["temperature"] == 1.0 and len(cal["id_labels_sha256"]) == 64


def test_calibration_refuses_another_model_or_label_set(tiny_encoder, tmp_path):
    neg = NegativeLabels([f"thing{i}" for i in range(8)], ["noun"] * 8)
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="neglabel", negatives=neg, num_groups=2, cache_dir=False)
    path = write_calibration(make_calibration(sc, [0.5, 0.6, 0.7]), tmp_path / "calibration.json")
    assert check_calibration(read_calibration(path), sc)["threshold"] == pytest.approx(0.5)
    other_labels = OODScorer(tiny_encoder, ["apple", "pear"], method="neglabel", negatives=neg, num_groups=2,
                             cache_dir=False)
    with pytest.raises(CalibrationError, match="id_labels_sha256"):
        check_calibration(read_calibration(path), other_labels, path)
    other_neg = OODScorer(tiny_encoder, ["apple", "leaf"], method="neglabel", negatives=NegativeLabels(["x"], ["noun"]),
                          num_groups=1, cache_dir=False)
    with pytest.raises(CalibrationError, match="neg_labels_sha256"):
        check_calibration(read_calibration(path), other_neg, path)
    other_prompt = OODScorer(tiny_encoder, ["apple", "leaf"], method="neglabel", negatives=neg, num_groups=2,
                             cache_dir=False, id_templates=["a photo of a {}."])
    with pytest.raises(CalibrationError, match="id_templates"):
        check_calibration(read_calibration(path), other_prompt, path)
    other_method = OODScorer(tiny_encoder, ["apple", "leaf"], method="mcm", negatives=neg, cache_dir=False)
    with pytest.raises(CalibrationError, match=r"method 'neglabel' \(file\) vs 'mcm'.*temperature"):
        check_calibration(read_calibration(path), other_method, path)
    cal = json.loads(path.read_text())
    cal["model"] = "ViT-B-16|openai|fp32|seed=-"
    (tmp_path / "other.json").write_text(json.dumps(cal))
    with pytest.raises(CalibrationError, match="other.json was made for another model.*model 'ViT-B-16"):
        check_calibration(read_calibration(tmp_path / "other.json"), sc, tmp_path / "other.json")
    for name, text, msg in (("missing.json", None, "no such calibration file"), ("bad.json", "{oops", "not a readable"),
                            ("fmt.json", "{}", "not a negvision calibration"),
                            ("nan.json", json.dumps({**cal, "threshold": "high"}), "finite number")):
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(CalibrationError, match=msg):
            read_calibration(tmp_path / name)


def test_model_identity_drops_machine_specific_paths():
    class E:
        cache_key = "local-dir:/data/models/clip|/data/models/clip/a.json:120:1700000000;/data/models/clip/b.bin:9:17|"\
                    "|fp32|seed=0"

    class F:
        cache_key = "ViT-B-32|/home/u/w/model.safetensors:600:1700000000|/home/u/w/model.safetensors|fp16|seed=-"

    assert model_identity(E()) == "local-dir:clip|a.json:120;b.bin:9||fp32|seed=0"
    assert model_identity(F()) == "ViT-B-32|model.safetensors:600|model.safetensors|fp16|seed=-"


def test_bench_writes_calibration_and_score_and_serve_use_it(setup, no_uvicorn):
    d, model, img = setup["dir"], setup["model"], setup["img"]
    out = d / "bench"
    r = runner.invoke(ood_app, ["bench", "--model", model, "--id-dir", str(img / "id"), "--ood-dir", str(img / "noise"),
                                "--method", "mcm", "--id-labels", str(d / "classes.txt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cal = json.loads((out / "calibration.json").read_text())
    rows = list(csv.DictReader(open(out / "scores.csv")))
    id_scores = np.array([float(x["score"]) for x in rows if x["set"] == "ID"])
    assert np.mean(id_scores >= cal["threshold"] - 1e-6) >= 0.95  # 95 % of ID kept
    assert json.loads((out / "metrics.json").read_text())["calibration"]["threshold"] == cal["threshold"]
    assert cal["fpr_at_threshold"]["noise"] == json.loads((out / "metrics.json").read_text())["per_set"]["noise"]["fpr95"]
    # ood score --calibration: is_ood at the calibrated threshold
    scores = d / "s.csv"
    args = ["score", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm", "--source",
            str(img / "id"), "--out", str(scores), "--no-resume"]
    r = runner.invoke(ood_app, [*args, "--calibration", str(out / "calibration.json")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["threshold"] == cal["threshold"]
    for row in csv.DictReader(open(scores)):
        assert row["is_ood"] == str(int(float(row["score"]) < cal["threshold"]))
    r = runner.invoke(ood_app, args)
    assert r.exit_code == 0 and "no threshold given" in r.output
    assert {row["is_ood"] for row in csv.DictReader(open(scores))} == {""}
    # ood serve --calibration: the app answers with it
    serve = ["serve", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm"]
    r = runner.invoke(ood_app, [*serve, "--calibration", str(out / "calibration.json")])
    assert r.exit_code == 0, r.output
    app = no_uvicorn.app

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = (await c.post("/v1/score", files=[("files", ("a.png", _png(), "image/png"))])).json()
            assert body["threshold"] == cal["threshold"] and body["threshold_source"] == "calibration"
            res = body["results"][0]
            assert res["is_ood"] == (res["score"] < cal["threshold"])
            lab = (await c.get("/v1/labels")).json()
            assert lab["calibration"]["tpr"] == 0.95

    asyncio.run(go())
    # made for another label set / method: refused, naming what differs
    (d / "other.txt").write_text("apple\npear\n")
    r = runner.invoke(ood_app, ["serve", "--model", model, "--id-labels", str(d / "other.txt"), "--method", "mcm",
                                "--calibration", str(out / "calibration.json")])
    assert r.exit_code == 1 and "made for another model or label set" in r.output and "id_labels" in r.output
    r = runner.invoke(ood_app, [*args, "--method", "energy", "--calibration", str(out / "calibration.json")])
    assert r.exit_code == 1 and "method 'mcm' (file) vs 'energy'" in r.output, r.output


def test_serve_options(setup, no_uvicorn, tmp_path, caplog, monkeypatch):
    d, model = setup["dir"], setup["model"]
    base = ["serve", "--model", model, "--id-labels", str(d / "classes.txt"), "--method", "mcm"]
    r = runner.invoke(ood_app, [*base, "--conf", "0.5", "--calibration", "c.json"])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(ood_app, [*base, "--method", "ants", "--ants-state", "s.json", "--workers", "2"])
    assert r.exit_code == 2 and "--workers 1" in r.output
    r = runner.invoke(ood_app, [*base, "--api-key-file", str(tmp_path / "nokeys.txt")])
    assert r.exit_code == 1 and "nokeys.txt: no such file" in r.output
    monkeypatch.delenv("NEGVISION_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="negvision.api"):
        r = runner.invoke(ood_app, [*base, "--host", "0.0.0.0"])
    assert r.exit_code == 0, r.output
    assert any("without an API key" in m for m in caplog.messages)
    assert no_uvicorn.kw["host"] == "0.0.0.0"
    caplog.clear()
    (tmp_path / "keys.txt").write_text("k1\nk2\n")
    with caplog.at_level(logging.WARNING, logger="negvision.api"):
        r = runner.invoke(ood_app, [*base, "--host", "0.0.0.0", "--api-key-file", str(tmp_path / "keys.txt"),
                                    "--max-request-mp", "1", "--timeout", "7", "--max-queue", "9"])
    assert r.exit_code == 0 and not any("without an API key" in m for m in caplog.messages)
    st = no_uvicorn.app.state.settings
    assert st.keys.keys() == ["k1", "k2"] and st.limits.max_request_pixels == 1_000_000
    assert st.serve.timeout_s == 7 and st.serve.max_queue == 9 and st.threshold is None
    r = runner.invoke(ood_app, base, env={"NEGVISION_API_KEY": "from-env"})
    assert r.exit_code == 0 and no_uvicorn.app.state.settings.keys.keys() == ["from-env"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_worker_processes_serve_and_sum_their_metrics(setup, tmp_path):
    """``--workers 2`` for real: two uvicorn worker processes (each its own model), /metrics summed over them."""
    import psutil

    d, model = setup["dir"], setup["model"]
    (tmp_path / "keys.txt").write_text("wkey\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "vision.cli", "ood", "serve", "--model", model, "--id-labels",
                             str(d / "classes.txt"), "--method", "mcm", "--port", str(port), "--workers", "2",
                             "--api-key-file", str(tmp_path / "keys.txt"), "--device", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    hdr = {"X-API-Key": "wkey"}
    try:
        t0 = time.time()
        ready = 0
        while time.time() - t0 < 180 and proc.poll() is None:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    ready += 1
                    if ready >= 4:
                        break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None and ready >= 4, proc.stdout.read() if proc.poll() is not None else "not ready"
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = [k for k in kids if "multiprocessing" in " ".join(k.cmdline()) or "spawn" in " ".join(k.cmdline())]
        assert len(workers) >= 2, [k.cmdline() for k in kids]
        pids = set()
        for i in range(12):
            with httpx.Client(base_url=base, timeout=30) as c:  # a new connection each time
                r = c.post("/v1/score", files=[("files", (f"{i}.png", _png((i * 20, 9, 9)), "image/png"))], headers=hdr)
                assert r.status_code == 200, r.text
                pids.add(c.get("/healthz").json()["pid"])
        assert pids <= {w.pid for w in workers}
        assert httpx.post(base + "/v1/score", files=[("files", ("a.png", _png(), "image/png"))]).status_code == 401
        text = httpx.get(base + "/metrics", headers=hdr, timeout=30).text
        from prometheus_client.parser import text_string_to_metric_families

        total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "negvision_ood_images_scored_total")
        assert total == 12  # every worker's count, whichever answered the scrape
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
