"""Run-folder rules shared by every training task: which folder a new run goes to, what a reused folder loses,
and the list of skipped inputs.

- ``--resume``: the folder is used as it is (the engine continues its logs).
- a new run into a folder that already holds files: the next free ``NAME2``, ``NAME3``, ... (ultralytics habit),
  said in a log line;
- ``--exist-ok``: the folder is reused after its logs, summaries and checkpoints of the earlier run are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vision.io import error_line, write_text_atomic

log = logging.getLogger("negvision.engine")

# what a reused run folder (--exist-ok) loses: the earlier run's logs, reports and checkpoints
RUN_OUTPUTS = ("log.csv", "metrics.csv", "tb", "summary.json", "train_summary.json", "config.json", "metrics.json",
               "config.yaml", "config.resumed.yaml", "skipped.txt", "checkpoints", "eval", "pr_curves.png",
               "val_predictions.jpg", "curves.png", "confusion_matrix.png", "f1_curve.png", "p_curve.png",
               "r_curve.png")
SKIPPED_FILE = "skipped.txt"
# what a run writes before its first training step: a folder holding only these (and empty folders) is a run that
# stopped before it trained (a mistyped backbone, a bad option value found late) and is reused, not numbered past
STARTUP_FILES = ("config.yaml", "config.resumed.yaml", "config.json", "skipped.txt", "detector.json", "segdec.json")
# folders a run opens at start-up (TensorBoard's event file is created with the writer): start-up files too when the
# folder holds no training log and no checkpoint
STARTUP_DIRS = ("tb",)


def _is_used(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def next_free_path(path: str | os.PathLike) -> Path:
    """``path`` if it is free (absent or an empty folder), else ``path2``, ``path3``, ... (first free one)."""
    p = Path(path)
    if not _is_used(p):
        return p
    n = 2
    while _is_used(p.with_name(f"{p.name}{n}")):
        n += 1
    return p.with_name(f"{p.name}{n}")


def clear_run_outputs(path: str | os.PathLike) -> list[str]:
    """Remove an earlier run's logs, reports and checkpoints from ``path``; returns what was removed."""
    p = Path(path)
    removed = []
    for name in RUN_OUTPUTS:
        q = p / name
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q)
        elif q.exists() or q.is_symlink():
            q.unlink()
        else:
            continue
        removed.append(name)
    return removed


def never_trained(path: str | os.PathLike) -> bool:
    """True for a folder that holds only a run's start-up files (``STARTUP_FILES``, ``STARTUP_DIRS``) and empty
    folders."""
    p = Path(path)
    if not p.is_dir():
        return False
    for q in p.iterdir():
        if q.is_dir() and not q.is_symlink():
            if q.name in STARTUP_DIRS:
                continue
            if any(q.iterdir()):
                return False
        elif q.name not in STARTUP_FILES:
            return False
    return True


def _decide(out: Path, resume: bool | str, exist_ok: bool) -> Path:
    if resume:
        return out
    if not _is_used(out):
        return out
    if never_trained(out):
        for name in (SKIPPED_FILE, "config.resumed.yaml"):  # the rest is written again by this run
            (out / name).unlink(missing_ok=True)
        for name in STARTUP_DIRS:  # e.g. an event file with no step in it
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
        log.info("reusing %s: the run there stopped before its first training step", out)
        return out
    if exist_ok:
        removed = clear_run_outputs(out)
        log.warning("--exist-ok: reusing %s (removed the earlier run's %s)", out, ", ".join(removed) or "nothing")
        return out
    new = next_free_path(out)
    log.warning("%s already holds a run; this run goes to %s (--resume continues it, --exist-ok reuses it)", out, new)
    return new


def prepare_run_dir(out: str | os.PathLike, *, resume: bool | str = False, exist_ok: bool = False) -> Path:
    """The folder a training run writes to, created. In a multi-process launch the main process decides and
    the others follow (so every rank writes to the same ``NAME2``)."""
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        state = PartialState()
        chosen = [str(_decide(out, resume, exist_ok)) if state.is_main_process else None]
        chosen = broadcast_object_list(chosen)
        result = Path(chosen[0])
        if state.is_main_process:
            result.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        return result
    result = _decide(out, resume, exist_ok)
    result.mkdir(parents=True, exist_ok=True)
    return result


def write_run_config(out: str | os.PathLike, config: Mapping[str, object]) -> Path:
    """``config.yaml``: the command's fully resolved options (``negvision ... --config OUT/config.yaml`` replays
    the run). Resuming keeps the first run's file and writes the new options to ``config.resumed.yaml``."""
    import yaml

    path = Path(out) / "config.yaml"
    if path.exists() and config.get("_resumed"):
        path = Path(out) / "config.resumed.yaml"
    body = {k: v for k, v in config.items() if not str(k).startswith("_")}
    write_text_atomic(path, "# negvision run options; replay with --config " + str(path) + "\n"
                      + yaml.safe_dump(body, sort_keys=False))
    return path


def read_run_options(path: str | os.PathLike) -> tuple[dict, Path] | None:
    """The options a run folder (or a checkpoint inside one) last ran with, and the file they came from: its
    ``config.resumed.yaml`` (written by the latest ``--resume``), else its ``config.yaml``; None when it has no
    ``config.yaml``. ValueError naming the file when it is not a YAML mapping."""
    import yaml

    first = find_spec(path, "config.yaml")
    if first is None:
        return None
    found = first.with_name("config.resumed.yaml")
    if not found.is_file():
        found = first
    try:
        data = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{found}: cannot read the run's options ({error_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{found}: the run's options must be a YAML mapping")
    return data, found


def write_skipped(out: str | os.PathLike, skipped: Mapping[str, Sequence[str]]) -> Path | None:
    """Write ``skipped.txt`` (one ``[split] file[:line]: problem`` per line) when anything was skipped."""
    lines = [f"[{split}] {msg}".replace("\n", " ") for split, msgs in skipped.items() for msg in msgs]
    path = Path(out) / SKIPPED_FILE
    if not lines:
        return None
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))
    return path


def record_skipped(out: str | os.PathLike, skipped: Mapping[str, Sequence[str]]) -> Path | None:
    """``write_skipped`` for a training run, and one warning with the count per split (``train 1, val 2``)."""
    path = write_skipped(out, skipped)
    if path is not None:
        counts = ", ".join(f"{split} {len(msgs)}" for split, msgs in skipped.items())
        log.warning("skipped %d bad items (%s), listed in %s", sum(map(len, skipped.values())), counts, path)
    return path


# ------------------------------------------------------------------------------------ reading a run folder back
# A run folder holds a spec file (``detector.json``, ``segdec.json``: what rebuilds the model), and the engine's
# ``checkpoints/{last,best}``. The spec's ``"weights"`` entry names the checkpoint that is the run's model ("best":
# the best validation score, "last": the final model); when that one is absent the other is used. Spec files
# written before the entry existed get the task's default.

CHECKPOINT_NAMES = ("best", "last")


def find_spec(path: str | os.PathLike, spec_name: str) -> Path | None:
    """The spec file ``spec_name`` in ``path`` (or next to a file), or up to three folders above it."""
    p = Path(path)
    start = p if p.is_dir() else p.parent
    for d in [start, *start.parents][:4]:
        if (d / spec_name).is_file():
            return d / spec_name
    return None


def read_spec(path: str | os.PathLike) -> dict:
    """A spec JSON file; ValueError naming the file when it is not valid JSON."""
    from vision.io import read_json

    p = Path(path)
    spec = read_json(p, "cannot read the run's spec file")
    if not isinstance(spec, dict):
        raise ValueError(f"{p}: the run's spec file must hold a JSON object")
    return spec


def find_weights_file(path: str | os.PathLike, prefer: str = "best", what: str = "model") -> Path:
    """The weights a path stands for: a weights file as given; in a run folder (or its checkpoints/), the
    ``prefer`` checkpoint ("best" or "last"), else the other; in a checkpoint folder its model.safetensors."""
    if prefer not in CHECKPOINT_NAMES:
        raise ValueError(f"prefer must be 'best' or 'last', got '{prefer}'")
    p = Path(path)
    if p.is_file():
        return p
    order = [prefer, *(n for n in CHECKPOINT_NAMES if n != prefer)]
    cands = [p / "checkpoints" / n / "model.safetensors" for n in order]
    cands += [p / "model.safetensors"] + [p / n / "model.safetensors" for n in order]
    for cand in cands:
        if cand.is_file():
            return cand
    if not p.exists():
        raise FileNotFoundError(f"'{p}' does not exist (expected a run folder, a checkpoint folder or a weights file)")
    raise FileNotFoundError(
        f"no {what} weights at '{p}' (looked for checkpoints/{order[0]}|{order[1]}/model.safetensors and "
        "model.safetensors); pass a run folder made by 'negvision ... train', a checkpoint folder or a weights file")


def run_weights(path: str | os.PathLike, spec_name: str, default: str, what: str = "model") -> tuple[Path, Path | None]:
    """(weights file, spec file or None) of a run folder / checkpoint / weights file, by the one rule above."""
    p = Path(path)
    spec_path = find_spec(p, spec_name)
    prefer = default
    if spec_path is not None and not p.is_file():
        prefer = str(read_spec(spec_path).get("weights", default))
    wfile = find_weights_file(p, prefer if prefer in CHECKPOINT_NAMES else default, what)
    return wfile, spec_path if spec_path is not None else find_spec(wfile, spec_name)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """In a multi-process launch the main process runs the block first (e.g. the data validation pass, which
    then leaves its cache for the others); a no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        yield
        return
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:
        state.wait_for_everyone()  # until the main process has run the block
    try:
        yield
    finally:  # also when the block raised: the others then run it too (and meet the same error) instead of hanging
        if state.is_main_process:
            state.wait_for_everyone()
