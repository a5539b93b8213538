"""benchmarks/defect_families.py runs on a tiny configuration (report and --choose) and prints one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--seeds", "0", "--n-train", "20", "--n-val", "10", "--n-test", "10", "--img-size", "32", "--epochs", "1",
        "--official-epochs", "1"]


def _run(*args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "defect_families.py"), *TINY, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_defect_families_smoke():
    res = _run("--families", "global_texture")
    for fam in ("global_texture",):
        s = res["families_result"][fam]["summary"]
        assert set(s) == {"texture_lr", "official_weak", "default", "masks_5pct", "patchcore"}
        assert all(0.0 <= v["AUROC"]["mean"] <= 1.0 for v in s.values())
    res = _run("--choose", "--choose-seeds", "100", "--families", "local_texture", "--candidates",
               "no_augment")
    assert set(res["val_auroc"]) == {"no_augment"} and "local_texture" in res["val_auroc"]["no_augment"]
