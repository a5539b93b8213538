"""``negvision data report`` on generated folders with planted problems: leakage (an exact copy and a resized,
re-encoded copy of train images in val), a class with one box, 2 px boxes, a double label; report.json figures,
the self-contained report.html (checked in headless Chromium where it is installed), the CLI end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vision.cli import app
from vision.data.digits import make_digits
from vision.data.report import REPORT_HTML, REPORT_JSON, ReportWriteError, make_report
from vision.data.report_basic import NEAR_THRESHOLD, near_pairs
from vision.data.report_sections import ReportSection, register_section, report_sections

runner = CliRunner()
IMG = 128  # generated image size; the report runs at --img-size 128 so sizes are the files' pixels
SECTIONS = ("counts", "geometry", "duplicates", "box_problems")


def _label_file(root: Path, split: str, stem: str) -> Path:
    return root / "labels" / split / f"{stem}.txt"


def plant_problems(root: Path) -> dict:
    """Plant the problems the report must find into a YOLO digits folder; returns what was planted."""
    img = root / "images"
    # 1. leakage: a train image copied into val, byte for byte
    shutil.copy(img / "train" / "train_00000.jpg", img / "val" / "val_leak.jpg")
    shutil.copy(_label_file(root, "train", "train_00000"), _label_file(root, "val", "val_leak"))
    # 2. a resized (0.75x) and re-encoded (JPEG q70) copy of another train image in val: near, not exact
    im = Image.open(img / "train" / "train_00001.jpg").convert("RGB")
    im.resize((IMG * 3 // 4, IMG * 3 // 4), Image.BILINEAR).save(img / "val" / "val_near.jpg", quality=70)
    shutil.copy(_label_file(root, "train", "train_00001"), _label_file(root, "val", "val_near"))
    # 3. class '9' has exactly one box in train: the first box of train_00002 becomes a 9, every other 9 an 8
    for f in sorted((root / "labels" / "train").glob("*.txt")):
        lines = f.read_text().splitlines()
        lines = [("8" + ln[1:]) if ln.startswith("9 ") else ln for ln in lines]
        if f.stem == "train_00002":
            lines[0] = "9" + lines[0][1:]
        f.write_text("\n".join(lines) + "\n")
    # 4. two 2 px boxes (tiny at 128 px)
    with _label_file(root, "train", "train_00003").open("a") as f:
        f.write(f"1 0.5 0.5 {2 / IMG:.6f} {2 / IMG:.6f}\n3 0.25 0.75 {2 / IMG:.6f} {20 / IMG:.6f}\n")
    # 5. a double label: train_00004's first box again, shifted by half a pixel (IoU > 0.9, same class)
    f = _label_file(root, "train", "train_00004")
    first = f.read_text().splitlines()[0].split()
    first[1] = f"{float(first[1]) + 0.5 / IMG:.6f}"
    f.write_text(f.read_text() + " ".join(first) + "\n")
    return {"leak": ("train/train_00000.jpg", "val/val_leak.jpg"), "near": ("train/train_00001.jpg", "val/val_near.jpg"),
            "double": "train_00004.jpg", "tiny": "train_00003.jpg"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = make_digits(tmp_path_factory.mktemp("planted") / "digits", format="yolo", n_train=16, n_val=6,
                       img_size=IMG, seed=3, max_objects=3)
    plant_problems(root)
    return root


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory) -> tuple[dict, dict, str]:
    out = tmp_path_factory.mktemp("report") / "rep"
    res = make_report(planted, out, img_size=IMG, progress=False)
    return res, json.loads((out / REPORT_JSON).read_text()), (out / REPORT_HTML).read_text()


def test_leakage_found_exact_and_near(report):
    res, doc, _ = report
    assert res["notes"] == [] and set(SECTIONS) <= set(doc["sections"])
    dup = doc["sections"]["duplicates"]
    assert dup["severe"] and res["severe"] and "duplicates" in res["headline"]["severe"]
    exact = [sorted(f"{x['split']}:{Path(x['path']).name}" for x in g["images"]) for g in dup["figures"]["exact"]["list"]]
    assert ["train:train_00000.jpg", "val:val_leak.jpg"] in exact
    near = [(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name, p["across"]) for p in dup["figures"]["near"]["list"]]
    assert ("train_00001.jpg", "val_near.jpg", True) in near
    # the resized copy is not an exact duplicate
    assert not any("val:val_near.jpg" in g for g in exact)
    assert dup["figures"]["exact"]["across_groups"] == 1 and dup["figures"]["near"]["across_pairs"] == 1
    assert res["headline"]["duplicates_across_splits"] == {"exact": 1, "near": 1, "images": 4}
    assert any("val_leak.jpg" in p for p in dup["problems"]) and any("val_near.jpg" in p for p in dup["problems"])


def test_counts_class_with_one_box(report, planted):
    _, doc, _ = report
    c = doc["sections"]["counts"]
    figs = c["figures"]
    assert figs["per_class"]["train"]["9"] == {"boxes": 1, "images": 1}
    assert figs["splits"]["val"]["images"] == 8 and figs["splits"]["train"]["images"] == 16
    n_train_boxes = sum(len(f.read_text().splitlines()) for f in (planted / "labels" / "train").glob("*.txt"))
    assert figs["splits"]["train"]["boxes"] == n_train_boxes
    assert sum(v["boxes"] for v in figs["per_class"]["train"].values()) == n_train_boxes
    assert any("class '9' has only 1 box in split 'train'" in p for p in c["problems"])
    for s, v in figs["splits"].items():  # a class absent from a split is listed and reported
        for cls in v["classes_absent"]:
            assert any(f"class '{cls}' has no box in split '{s}'" in p for p in c["problems"])


def test_tiny_boxes_and_double_label(report):
    _, doc, _ = report
    bp = doc["sections"]["box_problems"]["figures"]
    tiny = [(Path(t["path"]).name, t["size_at_img_size"]) for t in bp["tiny"]]
    assert ("train_00003.jpg", [2.0, 2.0]) in tiny and ("train_00003.jpg", [2.0, 20.0]) in tiny
    assert len(tiny) == 2
    doubles = [(Path(d["path"]).name, d["iou"]) for d in bp["double_labels"]]
    assert len(doubles) == 1 and doubles[0][0] == "train_00004.jpg" and doubles[0][1] > 0.9
    assert bp["splits"]["train"]["tiny"] == 2 and bp["splits"]["train"]["double_labels"] == 1


def test_geometry_at_img_size(report, planted, tmp_path):
    _, doc, _ = report
    g = doc["sections"]["geometry"]["figures"]
    assert g["anchor_sizes"] == [64, 128, 256, 512, 1024] and g["img_size"] == IMG
    train = g["splits"]["train"]
    assert train["boxes"] == doc["sections"]["counts"]["figures"]["splits"]["train"]["boxes"]
    assert sum(train["nearest_anchor_level"].values()) == train["boxes"]
    assert sum(map(sum, train["centre_histogram_10x10"])) == train["boxes"]
    assert train["width"]["min"] == pytest.approx(2.0)
    # at twice the resolution every size doubles (the letterbox scale of each image)
    doubled = make_report(planted, tmp_path / "r2", img_size=2 * IMG, progress=False)
    g2 = json.loads(Path(doubled["report_json"]).read_text())["sections"]["geometry"]["figures"]["splits"]["train"]
    assert g2["width"]["p50"] == pytest.approx(2 * train["width"]["p50"])
    assert json.loads(Path(doubled["report_json"]).read_text())["sections"]["box_problems"]["figures"]["tiny"] == []


def test_html_is_self_contained(report):
    _, doc, html = report
    for name in SECTIONS:
        assert f'<section id="{name}">' in html
        assert doc["sections"][name]["title"] in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(href|src)="(https?:|//)', html) and "<script" not in html and "<link" not in html
    assert "val_leak.jpg" in html and "val_near.jpg" in html  # the leaked pairs are listed with thumbnails


def test_near_pairs_bruteforce():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.uint64)
    h[5] = h[200] ^ np.uint64(0b1011)  # 3 bits apart
    pairs = near_pairs(h, 3, chunk=64)
    ref = [(i, j, bin(int(h[i]) ^ int(h[j])).count("1")) for i in range(300) for j in range(i + 1, 300)
           if bin(int(h[i]) ^ int(h[j])).count("1") <= 3]
    assert sorted(pairs) == sorted(ref) and (5, 200, 3) in pairs


def test_near_threshold_option(planted, tmp_path):
    res = make_report(planted, tmp_path / "r", img_size=IMG, near_threshold=0, progress=False)
    near = json.loads(Path(res["report_json"]).read_text())["sections"]["duplicates"]["figures"]["near"]
    assert near["list"] and all(p["distance"] == 0 for p in near["list"])  # identical hashes, different pixels
    wide = make_report(planted, tmp_path / "r2", img_size=IMG, near_threshold=20, progress=False)
    assert wide["headline"]["duplicates_across_splits"]["exact"] == 1
    assert len(wide["sections"]["duplicates"]) > len(res["sections"]["duplicates"])  # more pairs at a looser threshold


def test_clean_set_is_not_severe(tmp_path):
    root = make_digits(tmp_path / "clean", format="coco", n_train=8, n_val=4, img_size=64, seed=1, max_objects=2)
    res = make_report(root, tmp_path / "r", img_size=64, progress=False, strict=True)
    assert not res["severe"] and not res["strict_failed"]
    assert res["headline"]["duplicates_across_splits"] == {"exact": 0, "near": 0, "images": 0}
    assert res["format"] == "coco"


def test_other_formats(tmp_path):
    for fmt in ("voc", "labelme"):
        root = make_digits(tmp_path / fmt, format=fmt, n_train=4, n_val=2, img_size=64, seed=2, max_objects=2)
        res = make_report(root, tmp_path / f"r_{fmt}", img_size=64, progress=False)
        assert res["format"] == fmt and set(res["headline"]["splits"]) == {"train", "val"}


def test_defect_layout(tmp_path):
    from vision.data.defects import make_defects

    root = make_defects(tmp_path / "def", n_train=6, n_test=4, img_size=64, seed=0)
    good = next(ln.split(",")[0] for ln in (root / "train" / "labels.csv").read_text().splitlines()[1:]
                if ln.split(",")[1] == "0")
    shutil.copy(root / "train" / "images" / good, root / "test" / "images" / "test_leak.png")  # leakage
    with (root / "test" / "labels.csv").open("a") as f:
        f.write("test_leak.png,0,1,copied,\n")
    res = make_report(root, tmp_path / "r", progress=False)
    doc = json.loads(Path(res["report_json"]).read_text())
    assert doc["task"] == "defect" and set(doc["sections"]) >= {"counts", "duplicates"}
    assert "geometry" not in doc["sections"] and "box_problems" not in doc["sections"]
    assert doc["notes"] == []  # every section either applies or says it does not (None), none fails
    counts = doc["sections"]["counts"]["figures"]["splits"]
    assert counts["train"]["images"] == 6 and counts["train"]["good"] + counts["train"]["defective"] == 6
    assert counts["test"]["images"] == 5
    assert res["severe"] and res["headline"]["duplicates_across_splits"]["exact"] == 1
    assert any("test_leak.png" in p for p in res["sections"]["duplicates"])


def test_failing_section_is_a_note_not_a_crash(planted, tmp_path):
    from vision.data import report_sections as rs

    @register_section("zz_broken", order=999)
    def broken(ctx):
        raise RuntimeError("boom")

    @register_section("zz_extra", order=998)
    def extra(ctx):
        return ReportSection("Extra section", {"n": len(ctx.splits)}, "<p>extra</p>", ["one thing"])

    try:
        res = make_report(planted, tmp_path / "r", img_size=IMG, progress=False)
    finally:
        rs._SECTIONS.pop("zz_broken")
        rs._SECTIONS.pop("zz_extra")
    assert any("zz_broken failed: RuntimeError: boom" in n for n in res["notes"])
    assert res["sections"]["zz_extra"] == ["one thing"]
    html = Path(res["report_html"]).read_text()
    assert '<section id="zz_extra">' in html and "zz_broken failed" in html
    assert "zz_broken" not in dict(report_sections())


def test_unwritable_out_is_one_error(planted, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportWriteError, match="cannot write the report folder"):
        make_report(planted, blocker / "rep", progress=False)
    r = runner.invoke(app, ["data", "report", "--data", str(planted), "--out", str(blocker / "rep")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the report folder") and "Traceback" not in r.output


def test_cli_end_to_end(planted, tmp_path):
    out = tmp_path / "rep"
    r = runner.invoke(app, ["data", "report", "--data", str(planted), "--out", str(out), "--img-size", str(IMG)])
    assert r.exit_code == 0, r.output
    assert "LEAKAGE: duplicates across splits: 1 exact, 1 near (4 images)" in r.output
    assert "train 16 images" in r.output and "val 8 images" in r.output
    assert f"report: {out / REPORT_HTML}" in r.output
    assert (out / REPORT_HTML).is_file() and (out / REPORT_JSON).is_file()
    mode = (out / REPORT_HTML).stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # atomic writes honour the umask
    r = runner.invoke(app, ["data", "report", "--data", str(planted), "--out", str(out), "--img-size", str(IMG),
                            "--strict"])
    assert r.exit_code == 1 and "--strict: severe problems in Duplicates and leakage" in r.output
    r = runner.invoke(app, ["data", "report", "--data", str(planted), "--out", str(out), "--near-threshold", "0",
                            "--split", "val", "--format", "yolo"])
    assert r.exit_code == 0 and "val 8 images" in r.output and "train" not in r.output.splitlines()[0]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_cli_bad_image_named_or_skipped(tmp_path):
    root = make_digits(tmp_path / "d", format="yolo", n_train=6, n_val=3, img_size=64, seed=4, max_objects=2)
    bad = root / "images" / "val" / "val_00001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # cut short by a failed copy
    with (root / "labels" / "train" / "train_00002.txt").open("a") as f:
        f.write("1 0.5 0.5 0.0 0.1\n")  # a box of width 0: degenerate, refused by the reader
    out = tmp_path / "rep"
    r = runner.invoke(app, ["data", "report", "--data", str(root), "--out", str(out), "--no-cache"])
    assert r.exit_code == 1 and "val_00001.jpg" in r.output and "Traceback" not in r.output
    assert "train_00002.txt" in r.output  # every split's problems at once
    assert "lists them in the report" in r.output
    assert not (out / REPORT_HTML).exists()
    r = runner.invoke(app, ["data", "report", "--data", str(root), "--out", str(out), "--skip-bad", "--no-cache"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / REPORT_JSON).read_text())
    assert any("val_00001.jpg" in m for m in doc["skipped"]["val"])
    assert doc["headline"]["splits"]["val"]["images"] == 2
    bp = doc["sections"]["box_problems"]
    assert bp["figures"]["splits"]["train"]["dropped_by_reader"] == {"degenerate": 1}
    assert any("skipped by --skip-bad: 1 x degenerate box" in p for p in bp["problems"])
    assert any("train_00002.txt" in m for m in doc["skipped"]["train"])
    assert "val_00001.jpg" in (out / REPORT_HTML).read_text()


def test_cli_defaults_are_the_library_defaults():
    import inspect

    from vision.cli_data import report_cmd

    params = inspect.signature(report_cmd).parameters
    assert params["near_threshold"].default.default == NEAR_THRESHOLD
    assert params["img_size"].default.default == inspect.signature(make_report).parameters["img_size"].default


def test_cli_usage_errors(planted, tmp_path):
    r = runner.invoke(app, ["data", "report", "--data", str(planted), "--format", "yoloo"])
    assert r.exit_code == 2 and "yolo" in r.output
    r = runner.invoke(app, ["data", "report", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "no such file or folder" in r.output


# ------------------------------------------------------------------------------------ headless Chromium


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON
    on fds 3 / 4), so the test needs no websocket or Playwright package."""

    def __init__(self, exe: str) -> None:
        cmd_r, self._w = os.pipe()
        self._r, out_w = os.pipe()

        def child_fds() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             "--window-size=1280,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict:
        end = time.time() + timeout
        while b"\0" not in self._buf:
            left = end - time.time()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            r = self._read(timeout)
            if r.get("id") == self._id:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r.get("result", {})
            self.events.append(r)

    def wait_event(self, name: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == name:
                return self.events.pop(i)
        end = time.time() + timeout
        while True:
            r = self._read(max(0.01, end - time.time()))
            if r.get("method") == name:
                return r
            self.events.append(r)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium; .ci/run "
                    "installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    res = report[0]
    browser = _Chromium(_chromium())
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=s)
        browser.send("Page.navigate", {"url": Path(res["report_html"]).resolve().as_uri()}, session=s)
        browser.wait_event("Page.loadEventFired")
        probe = ("JSON.stringify({sections: Array.from(document.querySelectorAll('section')).map(x => x.id), "
                 "titles: Array.from(document.querySelectorAll('section h2')).map(x => x.textContent), "
                 "images: document.images.length, "
                 "decoded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length, "
                 "external: Array.from(document.images).filter(i => !i.src.startsWith('data:')).length, "
                 "height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth})")
        page = json.loads(browser.send("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                       session=s)["result"]["value"])
        metrics = {"width": 1280, "height": min(page["height"], 16000), "deviceScaleFactor": 1, "mobile": False}
        browser.send("Emulation.setDeviceMetricsOverride", metrics, session=s)
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"])
        browser.send("Runtime.evaluate", {"expression": "1"}, session=s)  # collect late console events
        errors = [e["params"] for e in browser.events
                  if (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))]
    finally:
        browser.close()
    assert errors == []
    assert set(SECTIONS) <= set(page["sections"])
    assert page["images"] >= 6 and page["decoded"] == page["images"] and page["external"] == 0
    assert page["width"] <= 1280  # nothing wider than the window (no horizontal scrolling)
    (tmp_path / "report.png").write_bytes(shot)
    if os.environ.get("NEGVISION_REPORT_SCREENSHOT"):  # to look at it: NEGVISION_REPORT_SCREENSHOT=/tmp/report.png
        Path(os.environ["NEGVISION_REPORT_SCREENSHOT"]).write_bytes(shot)
    im = np.asarray(Image.open(io.BytesIO(shot)).convert("L"))
    assert im.shape[1] == 1280 and im.std() > 10  # a page with content, not a blank screenshot
