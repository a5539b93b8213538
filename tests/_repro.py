"""Helpers of the reproducibility tests: compare a run's final weights, and kill a real training process with SIGKILL
part-way through (``tests/_pause_train.py`` holds it still after a given optimizer step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
LAST = Path("checkpoints") / "last" / "model.safetensors"


def weights(run: Path, rel: Path | str = LAST) -> dict[str, torch.Tensor]:
    """The tensors of a run's final checkpoint."""
    return load_file(str(Path(run) / rel))


def differing(a: Path, b: Path, rel: Path | str = LAST) -> list[str]:
    """Names of the tensors that are not bit-identical between two runs (all of them if the key sets differ)."""
    wa, wb = weights(a, rel), weights(b, rel)
    if wa.keys() != wb.keys():
        return sorted(set(wa) ^ set(wb)) or list(wa)
    return [k for k in wa if wa[k].dtype != wb[k].dtype or wa[k].shape != wb[k].shape or not torch.equal(wa[k], wb[k])]


def assert_same_weights(a: Path, b: Path, rel: Path | str = LAST) -> None:
    diff = differing(a, b, rel)
    assert not diff, f"{len(diff)} tensors differ between {a} and {b}, e.g. {diff[:3]}"


def cli_ok(*args: str) -> str:
    """Run ``negvision ARGS`` in this process; assert it succeeded, return its output."""
    from typer.testing import CliRunner

    from vision.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def kill_after_step(args: list[str], step: int, marker_dir: Path, timeout: float = 240.0) -> None:
    """Run ``negvision ARGS`` in a fresh process, SIGKILL it once optimizer step ``step`` is done (the checkpoint due
    at that step not yet written), and wait for it to die. The process gets this one's torch thread count."""
    marker = Path(marker_dir) / f"paused-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "NEGVISION_PAUSE_AT_STEP": str(step), "NEGVISION_PAUSE_MARKER": str(marker),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "_pause_train.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n"
                                     f"{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not reach step {step} in {timeout:.0f} s")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        marker.unlink(missing_ok=True)


def checkpoint_step(run: Path, sub: str = "") -> int:
    """The step of ``RUN/[sub/]checkpoints/last``."""
    import json

    return int(json.loads((Path(run) / sub / "checkpoints" / "last" / "meta.json").read_text())["step"])
