"""Tests' shorthand: flat keyword arguments split into a task's (config, TrainConfig, RunOptions) objects.

``batch`` is ``TrainConfig.batch_size``; ``run_config`` is ``RunOptions.config``.
An unknown name raises (a typo must not pass silently).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vision.engine.config import RunOptions, TrainConfig

_ALIASES = {"batch": "batch_size", "run_config": "config"}


def split(task_cls: type, out: Any, **kw: Any) -> tuple[Any, TrainConfig, RunOptions]:
    task_f = {f.name for f in dataclasses.fields(task_cls)}
    train_f = {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir", "device", "progress", "keep_last",
                                                                    "num_workers"}
    run_f = {f.name for f in dataclasses.fields(RunOptions)}
    task, train, run = {}, {}, {"out": out}
    for k, v in kw.items():
        if k in task_f:  # a task setting first (e.g. PatchCoreConfig.batch / seed)
            task[k] = v
        elif _ALIASES.get(k, k) in train_f:
            train[_ALIASES.get(k, k)] = v
        elif _ALIASES.get(k, k) in run_f:
            run[_ALIASES.get(k, k)] = v
        else:
            raise TypeError(f"no setting named {k!r}")
    return task_cls(**task), TrainConfig(**train), RunOptions(**run)


def train_segdec(data: Any, out: Any, **kw: Any) -> dict:
    from detectors.segdec import SegDecConfig
    from detectors.segdec import train_segdec as _train

    return _train(data, *split(SegDecConfig, out, **kw))
