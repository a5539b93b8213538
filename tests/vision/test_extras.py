"""Packaging: the detectors need none of the optional extras, and a command whose extra is missing says which one
to install (exit 2). Each case runs in a fresh interpreter; blocked packages are refused by a meta-path finder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("diffusers", "transformers", "open_clip", "fastapi", "uvicorn")

BLOCKER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"blocked by the test: {{name}}")
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_detect_train_imports_no_optional_extra(tmp_path):
    code = f"""
    import json, sys
    from vision.cli import app
    app(["data", "make-digits", "--out", "d", "--format", "yolo", "--n-train", "4", "--n-val", "2",
         "--img-size", "64"], standalone_mode=False)
    app(["-q", "detect", "train", "--data", "d", "--out", "run", "--backbone", "resnet18", "--pretrained", "false",
         "--img-size", "64", "--batch", "4", "--fpn-channels", "32", "--workers", "0", "--max-steps", "1"],
        standalone_mode=False)
    print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
    """
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir()


def test_a_missing_extra_gives_the_install_hint(tmp_path):
    for group, blocked, extra in (("ood", ("open_clip",), "ood"), ("generate", ("diffusers",), "diffusion"),
                                  ("neon", ("diffusers",), "diffusion"), ("retrieval", ("open_clip",), "ood")):
        code = BLOCKER.format(blocked=set(blocked)) + f"""
from vision.cli import app
app([{group!r}, "anything", "--x", "1"])
"""
        proc = _run(code, tmp_path)
        assert proc.returncode == 2, (group, proc.stderr[-2000:])
        assert f"pip install 'negvision[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_serve_without_the_api_extra(tmp_path):
    code = BLOCKER.format(blocked={"uvicorn", "fastapi"}) + """
from vision.cli import app
app(["ood", "serve", "--model", "m", "--id-labels", "x"])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'negvision[api]'" in proc.stderr and "Traceback" not in proc.stderr
