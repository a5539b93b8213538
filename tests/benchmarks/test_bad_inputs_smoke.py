"""benchmarks/bad_inputs.py: every generated case gives a kind and a message naming a file, or is accepted."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bad_inputs_table():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bad_inputs.py")], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "bad_inputs" and out["cases"] == len(out["rows"]) >= 30
    by_case = {r["case"]: r for r in out["rows"]}
    for r in out["rows"]:
        if r["default"] == "accepted":
            continue
        if r["default"] == "accepted, with this warning":
            assert r["message"] and ".txt" in r["message"], r
            continue
        assert r["kind"] and r["message"], r
        assert any(ext in r["message"] for ext in (".jpg", ".txt", ".json", ".xml", ".yaml")), r
    assert by_case["YOLO box beyond the edge by < 1 px"]["default"] == "accepted"
    assert by_case["YOLO coordinates outside 0..1"]["skip_bad"].startswith("that line")
    assert by_case["COCO two images sharing one id"]["skip_bad"] == "2 images skipped"
    assert by_case["COCO one file listed under two ids"]["kind"] == "duplicate_file"
    assert by_case["YOLO x.jpg and x.png sharing labels/x.txt"]["default"] == "accepted, with this warning"
    assert by_case["invalid data.yaml"]["skip_bad"].startswith("not skippable")
    assert by_case["val split absent"]["kind"] == "no_split"
