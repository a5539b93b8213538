"""The negvision CLI: --help of the root and every group exits 0; help stays light."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vision.cli import GROUPS, PLANNED, app

runner = CliRunner()


def test_root_help():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for g in list(GROUPS) + list(PLANNED):
        assert g in r.output


@pytest.mark.parametrize("group", sorted(set(GROUPS) | set(PLANNED)))
def test_group_help(group):
    r = runner.invoke(app, [group, "--help"])
    assert r.exit_code == 0, r.output


def test_planned_group_says_so(monkeypatch):
    monkeypatch.setitem(PLANNED, "future", "Something planned - not in this release yet.")
    r = runner.invoke(app, ["future"])
    assert r.exit_code == 2 and "not in this release yet" in r.output


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from vision.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'open_clip', 'timm') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_progress_lines_when_stderr_is_not_a_terminal(caplog):
    import logging

    from vision.progress import LineProgress, progress_bar, track

    assert isinstance(progress_bar(10), LineProgress)  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="negvision.progress"):
        bar = LineProgress(100, desc="work", unit="img", quiet_s=0.0)
        for _ in range(100):
            bar.update(1)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 10 and lines[0].startswith("work:  10% (10/100)") and "100% (100/100)" in lines[-1]
        caplog.clear()
        assert list(track(range(5), desc="short")) == [0, 1, 2, 3, 4]
        assert caplog.records == []  # a task shorter than 5 s prints nothing
