"""One training loop for every task, on HF Accelerate: AMP, grad accumulation, DDP, exact resume."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..device import best_mixed_precision, pick_device
from ..seeding import seed_everything, use_deterministic
from ..weights_io import CheckpointCorruptError
from .checkpoint import (
    META_FILE,
    CheckpointNotFoundError,
    get_rng_state,
    load_model_weights,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint_atomic,
    set_rng_state,
    verify_checkpoint,
    write_json_atomic,
)
from .config import TrainConfig
from .curves import try_plot_training_curves as _plot_curves
from .logs import CSVLog as _CSVLog
from .logs import peak_memory_mb as _peak_memory_mb
from .logs import truncate_csv as _truncate_csv
from .optim import build_optimizer as _build_optimizer
from .sampler import SeededSampler
from .schedule import build_scheduler

logger = logging.getLogger("negvision.engine")

Callback = Callable[["Trainer", str, dict], None]


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``max_bad_steps`` optimizer steps in a row."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM (or ``request_stop``) after saving a resumable checkpoint."""

    def __init__(self, message: str, checkpoint: Path | None = None, summary: dict | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.summary = summary or {}


def default_batch_size(batch: Any) -> int:
    """Best guess of the number of samples in a batch (tensor, list of images, tuple, dict)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, (Tensor, list, tuple)):
                return default_batch_size(v)
        return 1
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if (
            isinstance(first, Tensor)
            and first.dim() > 0
            and all(isinstance(b, Tensor) and b.dim() > 0 and b.shape[0] == first.shape[0] for b in batch)
            and len(batch) <= 4
        ):
            return int(first.shape[0])  # (inputs, targets, ...) tuple of stacked tensors
        if isinstance(first, (list, tuple)):
            return len(first)  # (list of images, list of targets)
        return len(batch)
    return 1


def _split_loss(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and the components to log from a loss_fn result."""
    if isinstance(out, Tensor):
        return out, {}
    if isinstance(out, dict):
        comps = {k: v for k, v in out.items() if k != "loss"}
        if "loss" in out:
            total = out["loss"]
        else:  # torchvision-style loss dict: the total is the sum
            vals = [v for v in comps.values() if isinstance(v, Tensor)]
            if not vals:
                raise TypeError("loss_fn returned a dict without tensors")
            total = sum(vals)
        return total, comps
    raise TypeError(f"loss_fn must return a Tensor or a dict of Tensors, got {type(out).__name__}")


def _to_float(v: Any) -> float:
    return float(v.detach().float().mean()) if isinstance(v, Tensor) else float(v)


def _resolve_mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if _on_cpu(cfg) or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "no"
    return best_mixed_precision(pick_device())


def _on_cpu(cfg: TrainConfig) -> bool:
    """Whether the run trains on the CPU (``cfg.device``; a task applies ``cuda:N`` with
    ``vision.device.training_device`` before CUDA starts)."""
    return (cfg.device or "").lower() == "cpu"


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate.state import AcceleratorState, PartialState

    kwargs: dict[str, Any] = dict(
        mixed_precision=_resolve_mixed_precision(cfg),
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=_on_cpu(cfg),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout_s)),
        ],
    )
    try:
        return Accelerator(**kwargs)
    except ValueError as e:
        # a previous Trainer in this (single) process fixed another precision: start afresh
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


_STEP_DIR = re.compile(r"step-(\d+)")


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoints/step-XXXXXXX`` directories, oldest first."""
    out = []
    for p in ckpt_dir.glob("step-*"):
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _meta_step(directory: Path) -> int | None:
    """The ``step`` recorded in ``directory/meta.json`` (None if unreadable)."""
    try:
        with open(directory / META_FILE, encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None


@dataclass(frozen=True)
class LossContext:
    """Where the loop is when it calls ``loss_fn(model, batch, ctx)``: epoch (0-based), the optimizer step about to
    be taken (0-based), the total number of steps, and the batch's index in its epoch."""

    epoch: int
    step: int
    total_steps: int
    batch_in_epoch: int
    steps_per_epoch: int
    trainer: Trainer | None = None


def _takes_context(fn: Callable, n: int = 3) -> bool:
    """True when ``fn`` accepts ``n`` positional arguments (the last one being the LossContext)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= n


class Trainer:
    """Generic loop: ``loss_fn(model, batch[, ctx])`` -> loss (or dict with "loss"); optional ``eval_fn(model)``.

    Args:
        model: the module to train (wrapped by Accelerate for devices, AMP and DDP).
        train_dataset_or_loader: a map-style Dataset (seeded order; ``config.batch_size``, ``config.num_workers``,
            ``config.drop_last`` and ``collate_fn`` apply) or a sized DataLoader used as given.
        config: a :class:`TrainConfig`.
        loss_fn: ``(model, batch) -> Tensor | dict`` or ``(model, batch, ctx: LossContext) -> ...`` (epoch, step and
            total steps, for schedules inside the loss); a dict's "loss" (or the sum of its tensors) is optimised,
            the other entries are logged.
        eval_fn: ``model -> {metric: float}`` (or ``(model, ctx) -> ...``), run every ``config.eval_every`` epochs
            on the main process.
        metric: the metric that selects ``checkpoints/best``; mode: "max" or "min".
        collate_fn: the DataLoader's when a Dataset is given.
        optimizer: custom parameter groups (a list of dicts; the optimizer is built from ``config``), or a ready
            optimizer.
        batch_size_fn: samples in a batch (for images/s); default: :func:`default_batch_size`.
        extra_config: saved in config.json and every checkpoint's meta.json.
        callbacks: ``cb(trainer, event, info)`` for fit_start, step_end, epoch_end, eval, checkpoint, fit_end.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset_or_loader: Dataset | DataLoader,
        config: TrainConfig,
        *,
        loss_fn: Callable[[nn.Module, Any], dict[str, Tensor] | Tensor],
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        metric: str | None = None,
        mode: str = "max",
        collate_fn: Callable | None = None,
        optimizer: torch.optim.Optimizer | list[dict] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        extra_config: dict | None = None,
        callbacks: Sequence[Callback] | None = None,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        if not config.out_dir:
            raise ValueError("TrainConfig.out_dir is empty: the Trainer needs a run folder")
        self.config = cfg = config.resolved()  # unset task defaults: the engine's
        self.loss_fn = loss_fn
        self._loss_takes_ctx = _takes_context(loss_fn)
        self._eval_takes_ctx = eval_fn is not None and _takes_context(eval_fn, 2)
        self.eval_fn = eval_fn
        self.metric = metric
        self.mode = mode
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.extra_config = dict(extra_config or {})
        self.callbacks: list[Callback] = list(callbacks or [])
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            use_deterministic(True)  # before the model reaches the device (cuBLAS reads its setting once)
        self.accelerator = _make_accelerator(cfg)
        seed_everything(cfg.seed)

        # data: a Dataset gets a (seed, epoch)-determined order; a DataLoader is used as given
        self._sampler: SeededSampler | None = None
        if isinstance(train_dataset_or_loader, DataLoader):
            loader = train_dataset_or_loader
            if loader.generator is None:
                loader.generator = torch.Generator()  # keeps worker seeds off the global RNG
        else:
            self._sampler = SeededSampler(train_dataset_or_loader, seed=cfg.seed)
            loader = DataLoader(
                train_dataset_or_loader,
                batch_size=cfg.batch_size,
                sampler=self._sampler,
                num_workers=cfg.num_workers,
                collate_fn=collate_fn,
                drop_last=cfg.drop_last,
                pin_memory=self.accelerator.device.type == "cuda",
                generator=torch.Generator(),
                persistent_workers=False,
            )
        self._loader_generator: torch.Generator = loader.generator

        if not isinstance(optimizer, torch.optim.Optimizer):  # None or parameter groups
            params = optimizer if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
            optimizer = _build_optimizer(cfg, params)
        self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, optimizer, loader)
        try:
            self.batches_per_epoch = len(self.train_loader)
        except TypeError as e:
            raise TypeError(
                "the training data must have a length (a map-style Dataset or a sized DataLoader)"
            ) from e
        if self.batches_per_epoch == 0:
            raise ValueError(
                "the training data loader is empty (no batches); check the dataset and batch_size"
            )
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            self.total_steps,
            cfg.scheduler,
            warmup_steps=cfg.warmup_steps,
            warmup_factor=cfg.warmup_factor,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
            min_lr_factor=cfg.min_lr_factor,
        )

        # counters (position = next batch to consume)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.elapsed_before = 0.0
        self._stop_signal: int | None = None
        self._last_saved: tuple[int, int, int] | None = None
        self._last_is_damaged = False  # resumed from an older checkpoint because checkpoints/last is damaged
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """True on the main process."""
        return self.accelerator.is_main_process

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DDP / compile wrappers."""
        return self.accelerator.unwrap_model(self.model)

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step, saving a checkpoint (same path as SIGINT)."""
        self._stop_signal = self._stop_signal or signal.SIGINT

    def context(self) -> LossContext:
        """The loop's position, as passed to a three-argument ``loss_fn``."""
        return LossContext(self.epoch, self.global_step, self.total_steps, self.batch_in_epoch,
                           self.steps_per_epoch, self)

    def _call_loss(self, batch: Any) -> Any:
        if self._loss_takes_ctx:
            return self.loss_fn(self.model, batch, self.context())
        return self.loss_fn(self.model, batch)

    def _emit(self, event: str, info: dict) -> None:
        for cb in self.callbacks:
            cb(self, event, info)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def lr(self) -> float:
        """Learning rate of the first parameter group used by the last optimizer step."""
        lr = getattr(self, "_step_lr", None)
        return self._lr() if lr is None else lr

    def _position(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    def _better(self, value: float) -> bool:
        if self.best_metric is None or math.isnan(self.best_metric):
            return not math.isnan(value)
        return value > self.best_metric if self.mode == "max" else value < self.best_metric

    # ------------------------------------------------------------------------------------------ state

    def _training_state(self, rng_states: list) -> dict:
        scaler = self.accelerator.scaler
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "skipped_steps": self.skipped_steps,
            "consecutive_bad": self.consecutive_bad,
            "elapsed": self.elapsed_before + self._elapsed(),
            "rng": rng_states,
            "num_processes": self.accelerator.num_processes,
            "grad_accum": self.config.grad_accum,
            "total_steps": self.total_steps,
        }

    def _elapsed(self) -> float:
        return time.time() - self._fit_start if hasattr(self, "_fit_start") else 0.0

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last`` atomically (collective: call on every process)."""
        acc = self.accelerator
        rng = get_rng_state()
        if acc.num_processes > 1 and torch.distributed.is_initialized():
            gathered: list = [None] * acc.num_processes
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        path = self.ckpt_dir / "last"
        if self.is_main:
            keep_older = max(self.config.keep_last, 1) - 1
            previous_to = None
            if keep_older > 0 and (path / META_FILE).exists() and not self._last_is_damaged:
                # keep the checkpoint now in "last" as step-N (N read from its meta.json: after a resume
                # or in a re-used out_dir it need not be one this trainer wrote), unless it is not older
                prev = _meta_step(path)
                if prev is not None and prev < self.global_step:
                    previous_to = self.ckpt_dir / f"step-{prev:07d}"
            meta = {
                "step": self.global_step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total_steps,
                "best_metric": self.best_metric,
                "metric": self.metric,
                "last_metrics": self.last_metrics,
                "time": time.time(),
                "config": self.config.to_dict(),
                "extra_config": self.extra_config,
            }
            save_checkpoint_atomic(
                path,
                self.unwrapped_model,
                self._training_state(rng_states),
                meta=meta,
                previous_to=previous_to,
            )
            self._last_is_damaged = False
            for stale in [*self.ckpt_dir.glob("*.tmp-*"), *self.ckpt_dir.glob("*.trash-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
            # older copies: the newest keep_last-1 below this step; step-N >= this step belong to an abandoned
            # timeline (a run resumed from further back, or an earlier run in this out_dir)
            olds = _step_dirs(self.ckpt_dir)
            current = [p for n, p in olds if n < self.global_step or p == previous_to]
            drop = [p for n, p in olds if n >= self.global_step and p != previous_to]
            drop += current[: max(len(current) - keep_older, 0)]
            for old in drop:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self._last_saved = self._position()
        self._emit("checkpoint", {"path": str(path), "step": self.global_step})
        return path

    def _load_checkpoint(self, resume: bool | str) -> Path:
        """Restore from ``checkpoints/last`` (``resume=True``) or the directory ``resume``; returns the one used.

        Damage is looked for first (:func:`verify_checkpoint`, on the main process). With ``resume=True`` a
        damaged ``last`` makes it fall back to the newest ``step-*`` that verifies and loads, with a warning;
        an explicit directory must itself be intact.
        """
        acc = self.accelerator
        multi = acc.num_processes > 1
        path = self.ckpt_dir / "last" if resume is True else Path(resume)
        error: str | None = None
        candidates: list[str] = []
        if self.is_main:  # only the main process may repair an interrupted rename
            try:
                candidates.append(str(resolve_checkpoint(path)))
            except CheckpointNotFoundError as e:
                error = str(e)
            else:
                if resume is True:  # older copies, newest first
                    candidates += [str(p) for _, p in reversed(_step_dirs(self.ckpt_dir))]
        if multi:
            from accelerate.utils import broadcast_object_list

            error, candidates = broadcast_object_list([error, candidates])
        if error is not None:
            raise CheckpointNotFoundError(error)

        failures: list[tuple[str, CheckpointCorruptError]] = []
        for i, cand in enumerate(candidates):
            err = self._verify_everywhere(Path(cand))
            if err is None:
                err = self._load_everywhere(Path(cand))
            if err is None:
                if i > 0:
                    self._last_is_damaged = True  # the next save replaces "last" instead of keeping it
                self._last_saved = self._position()
                self._forget_damaged_best()
                return Path(cand)
            failures.append((cand, err))
            if self.is_main and i + 1 < len(candidates):
                logger.warning("%s; falling back to %s", err, candidates[i + 1])
        first = failures[0][1]
        if resume is not True:
            raise first
        tried = "\n".join(f"  {c}: {e}" for c, e in failures)
        raise CheckpointCorruptError(
            first.path,
            first.reason,
            message=(
                f"{first}; no checkpoint in {self.ckpt_dir} can be resumed from "
                f"(tried {len(failures)}, newest first):\n{tried}"
            ),
        )

    def _forget_damaged_best(self) -> None:
        """A damaged ``checkpoints/best`` found on resume is forgotten (with a warning): the next evaluation
        writes a new best instead of the run ending on a file nobody can load."""
        best = self.ckpt_dir / "best"
        if self.best_metric is None or not best.is_dir():
            return
        err = self._verify_everywhere(best)
        if err is not None:
            if self.is_main:
                logger.warning("%s; the best checkpoint is forgotten and the next evaluation writes a new one", err)
            self.best_metric, self.best_step = None, None

    def _agree_on_error(
        self, err: CheckpointCorruptError | None, main_only: bool
    ) -> CheckpointCorruptError | None:
        """The first error of any process (or of the main one), the same on every process."""
        if self.accelerator.num_processes <= 1:
            return err
        import torch.distributed as dist

        mine = None if err is None else (str(err.path), err.reason, str(err))
        if main_only:
            from accelerate.utils import broadcast_object_list

            found = [broadcast_object_list([mine])[0]]
        elif dist.is_initialized():
            found = [None] * self.accelerator.num_processes
            dist.all_gather_object(found, mine)
        else:
            found = [mine]
        first = next((f for f in found if f is not None), None)
        return None if first is None else CheckpointCorruptError(first[0], first[1], message=first[2])

    def _verify_everywhere(self, directory: Path) -> CheckpointCorruptError | None:
        err = None
        if self.is_main:
            try:
                verify_checkpoint(directory)
            except CheckpointCorruptError as e:
                err = e
        return self._agree_on_error(err, main_only=True)

    def _load_everywhere(self, directory: Path) -> CheckpointCorruptError | None:
        """Load a (verified) checkpoint on every process; a damaged file anywhere -> its error everywhere."""
        err = None
        try:
            self._apply_checkpoint(directory)
        except CheckpointCorruptError as e:
            err = e
        return self._agree_on_error(err, main_only=False)

    def _apply_checkpoint(self, path: Path) -> None:
        # read everything before changing anything, so a damaged file leaves the trainer as it was
        st = load_training_state(path, verify=False)  # verify_checkpoint has hashed the files already
        load_model_weights(self.unwrapped_model, path, verify=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        # the next step's lr from this run's schedule: the saved one unless the total changed (a run extended with
        # a larger --epochs / --max-steps follows the schedule recomputed for the new total from here on)
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        old_total = st.get("total_steps")
        if old_total is not None and old_total != self.total_steps and self.is_main:
            logger.warning("the run was set to %d steps, now %d: the learning-rate schedule is recomputed for %d "
                           "steps from step %d on", old_total, self.total_steps, self.total_steps, int(st["step"]))
        if st.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(st["scaler"])
        self.global_step = int(st["step"])
        self.epoch = int(st["epoch"])
        self.batch_in_epoch = int(st["batch_in_epoch"])
        self.best_metric = st.get("best_metric")
        self.best_step = st.get("best_step")
        self.skipped_steps = int(st.get("skipped_steps", 0))
        self.consecutive_bad = int(st.get("consecutive_bad", 0))
        self.elapsed_before = float(st.get("elapsed", 0.0))
        if (
            st.get("num_processes") != self.accelerator.num_processes
            or st.get("grad_accum") != self.config.grad_accum
        ):
            logger.warning(
                "resuming with %s processes / grad_accum %s (checkpoint: %s / %s): the data order will differ "
                "from an uninterrupted run",
                self.accelerator.num_processes,
                self.config.grad_accum,
                st.get("num_processes"),
                st.get("grad_accum"),
            )
        rngs = st.get("rng") or []
        if rngs:
            idx = self.accelerator.process_index
            set_rng_state(rngs[idx] if idx < len(rngs) else rngs[0])

    # ------------------------------------------------------------------------------------------ eval

    def _run_eval(self) -> dict[str, float]:
        acc = self.accelerator
        metrics: dict[str, float] = {}
        if self.eval_fn is not None and self.is_main:
            model = self.unwrapped_model
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    res = self.eval_fn(model, self.context()) if self._eval_takes_ctx else self.eval_fn(model)
                    metrics = {k: _to_float(v) for k, v in (res or {}).items()}
            finally:
                model.train(was_training)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics])[0]
        self._last_eval_step = self.global_step
        self.last_metrics = metrics
        if not metrics:
            return metrics
        improved = False
        if self.metric is not None:
            if self.metric not in metrics:
                raise KeyError(
                    f"eval_fn returned {sorted(metrics)}, which lacks the tracked metric '{self.metric}'"
                )
            value = metrics[self.metric]
            if self._better(value):
                self.best_metric, self.best_step, improved = value, self.global_step, True
        if self.is_main:
            _CSVLog(self.out_dir / "metrics.csv").write(
                {"step": self.global_step, "epoch": self.epoch, **metrics}
            )
            if self._tb is not None:
                for k, v in metrics.items():
                    self._tb.add_scalar(f"eval/{k}", v, self.global_step)
            msg = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            self._write(f"eval @ step {self.global_step}: {msg}" + (" (best)" if improved else ""))
            _plot_curves(self.out_dir)  # curves.png; a failed picture only logs a warning
            if improved:
                save_checkpoint_atomic(
                    self.ckpt_dir / "best",
                    self.unwrapped_model,
                    None,
                    meta={
                        "step": self.global_step,
                        "epoch": self.epoch,
                        "metric": self.metric,
                        "value": self.best_metric,
                    },
                    json_files={"metrics.json": {"step": self.global_step, "epoch": self.epoch, **metrics}},
                )
        acc.wait_for_everyone()
        self._emit("eval", {"step": self.global_step, "metrics": metrics, "improved": improved})
        return metrics

    # ------------------------------------------------------------------------------------------ logging

    def _write(self, msg: str) -> None:
        if not self.is_main:
            return
        logger.info(msg)
        cli_logging = bool(logging.getLogger("negvision").handlers)  # the CLI shows logger.info already
        if not cli_logging and self._pbar is not None and not self._pbar.disable:
            self._pbar.write(msg)

    def _open_logs(self, resumed: bool) -> None:
        self._tb = None
        self._pbar = None
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            _truncate_csv(self.out_dir / "log.csv", self.global_step)
            _truncate_csv(self.out_dir / "metrics.csv", self.global_step)
        else:  # a new run in a folder used before: its logs start empty (never appended to the old run's)
            for old in (self.out_dir / "log.csv", self.out_dir / "metrics.csv", *(self.out_dir / "tb").glob("events.*")):
                old.unlink(missing_ok=True)
        self._csv = _CSVLog(self.out_dir / "log.csv")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.out_dir / "tb"), purge_step=self.global_step if resumed else None
            )
        except Exception:  # tensorboard not installed
            self._tb = None
        from vision.progress import progress_bar

        self._pbar = progress_bar(self.total_steps, desc="train", unit="step", initial=self.global_step,
                                  enabled=self.config.progress)

    def _close_logs(self) -> None:
        if getattr(self, "_pbar", None) is not None:
            self._pbar.close()
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
        self._pbar = self._tb = None

    def _log_step(self, sums: dict[str, Tensor], count: int, samples: int, t0: float) -> dict[str, float]:
        acc = self.accelerator
        keys = sorted(sums)
        if count > 0:
            vec = torch.stack([sums[k].float() for k in keys]) / count
        else:
            vec = torch.full((len(keys),), float("nan"), device=acc.device)
        if acc.num_processes > 1 and keys:
            vec = acc.reduce(vec.to(acc.device), reduction="mean")
        vals = dict(zip(keys, vec.tolist(), strict=True)) if keys else {}
        dt = max(time.time() - t0, 1e-9)
        ips = samples * acc.num_processes / dt
        row = {
            "step": self.global_step,
            "epoch": self.epoch,
            "lr": self.lr,
            "loss": vals.pop("loss", float("nan")),
            **vals,
            "images_per_s": ips,
            "time": self.elapsed_before + self._elapsed(),
        }
        if self.is_main:
            self._csv.write(row)
            if self._tb is not None:
                for k, v in row.items():
                    if k not in ("step", "epoch", "time"):
                        self._tb.add_scalar(f"train/{k}", v, self.global_step)
            if self._pbar is not None:
                self._pbar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}", img_s=f"{ips:.1f}")
        return row

    # ------------------------------------------------------------------------------------------ signals

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                for s, h in previous.items():
                    signal.signal(s, h)
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[s] = signal.signal(s, handler)
            except (ValueError, OSError):
                pass
        return previous

    # ------------------------------------------------------------------------------------------ fit

    def _set_epoch(self, epoch: int) -> None:
        self._loader_generator.manual_seed(self.config.seed * 1_000_003 + epoch)
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        ds = getattr(self.train_loader, "dataset", None)
        if hasattr(ds, "set_epoch"):  # epoch-dependent datasets (e.g. seeded augmentation): resumes replay them
            ds.set_epoch(epoch)
        bs = getattr(self.train_loader, "batch_sampler", None)
        for _ in range(3):  # a given loader's own batch sampler (maybe wrapped by accelerate for sharding)
            if bs is None:
                break
            if hasattr(bs, "set_epoch"):
                bs.set_epoch(epoch)
                break
            bs = getattr(bs, "batch_sampler", None)

    def fit(self, resume: bool | str = False) -> dict:
        """Train to ``max_steps`` (or ``epochs``); returns a summary and writes ``summary.json``."""
        cfg, acc = self.config, self.accelerator
        seed_everything(cfg.seed)  # a resumed run then restores the generators of its checkpoint
        self._stop_signal = None
        resumed_from = None
        if resume:
            resumed_from = self._load_checkpoint(resume)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.out_dir / "config.json",
                {
                    "train": cfg.to_dict(),
                    "extra": self.extra_config,
                    "num_processes": acc.num_processes,
                    "mixed_precision": acc.mixed_precision,
                    "device": str(acc.device),
                    "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                    "resumed_from": str(resumed_from) if resumed_from else None,
                },
            )
        self._open_logs(resumed=resumed_from is not None)
        if resumed_from is not None:
            self._write(f"resumed from {resumed_from} at step {self.global_step} (epoch {self.epoch})")
        previous_handlers = self._install_signals()
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        self._fit_start = time.time()
        train_time, samples_total, last_row = 0.0, 0, {}
        try:
            self._emit("fit_start", {"step": self.global_step,
                                     "resumed_from": str(resumed_from) if resumed_from is not None else None})
            if self.eval_fn is not None and cfg.eval_at_start and resumed_from is None and self.global_step == 0:
                self._run_eval()  # the starting point competes for checkpoints/best (training must beat it)
            # (an interrupted run may stop right at the end of an epoch: finish that epoch's bookkeeping)
            while self.global_step < self.total_steps or self.batch_in_epoch >= self.batches_per_epoch:
                ended_epoch, interrupted, stats = self._train_epoch()
                train_time += stats["time"]
                samples_total += stats["samples"]
                last_row = stats["last_row"] or last_row
                if ended_epoch and not interrupted:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self._emit("epoch_end", {"epoch": self.epoch, "step": self.global_step})
                    if self.eval_fn is not None and cfg.eval_every > 0 and self.epoch % cfg.eval_every == 0:
                        self._run_eval()
                    self.save_checkpoint()
                if interrupted:  # position may be "end of epoch": the resumed run then does the eval first
                    path = self.save_checkpoint()
                    msg = f"interrupted at step {self.global_step}; checkpoint saved to {path}; resume with --resume"
                    if self.is_main:
                        logger.warning(msg)
                    raise TrainingInterrupted(
                        msg, path, self._summary(train_time, samples_total, last_row, True)
                    )
            if self.eval_fn is not None and cfg.eval_every > 0 and self._last_eval_step != self.global_step:
                self._run_eval()
            if self._last_saved != self._position():
                self.save_checkpoint()
            summary = self._summary(train_time, samples_total, last_row, False)
            if self.is_main:
                write_json_atomic(self.out_dir / "summary.json", summary)
                _plot_curves(self.out_dir)
            self._emit("fit_end", summary)
            return summary
        finally:
            for s, h in previous_handlers.items():
                signal.signal(s, h)
            self._close_logs()
            if cfg.deterministic and not self._deterministic_before:
                use_deterministic(False)  # leave the process as it was (one run in a notebook or a test)

    def _summary(self, train_time: float, samples: int, last_row: dict, interrupted: bool) -> dict:
        return {
            "steps": self.global_step,
            "epochs": self.epoch + self.batch_in_epoch / self.batches_per_epoch,
            "total_steps": self.total_steps,
            "metric": self.metric,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "last_metrics": dict(self.last_metrics),
            "last_loss": last_row.get("loss"),
            "images_per_s": samples * self.accelerator.num_processes / train_time if train_time > 0 else None,
            "peak_memory_mb": _peak_memory_mb(self.accelerator.device),
            "skipped_steps": self.skipped_steps,
            "train_time_s": train_time,
            "checkpoint": str(self.ckpt_dir / "last"),
            "interrupted": interrupted,
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
        }

    def _accumulate(self, sums: dict[str, Tensor], loss: Tensor, comps: dict[str, Any]) -> None:
        """Add one finite micro-batch's loss and components to the running sums (on the device)."""
        dev = self.accelerator.device
        for k, v in (("loss", loss), *comps.items()):
            v = v.detach().float().mean().to(dev) if isinstance(v, Tensor) else torch.tensor(float(v), device=dev)
            sums[k] = sums[k] + v if k in sums else v.clone()

    def _optimizer_step(self, skip: bool) -> None:
        """One optimizer step (clipped), or a skipped one after a non-finite loss; then the scheduler."""
        cfg, acc = self.config, self.accelerator
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_bad += 1
        else:
            if cfg.clip_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
            self.optimizer.step()
            self.consecutive_bad = 0
        self.optimizer.zero_grad(set_to_none=True)
        self._step_lr = self._lr()  # the lr this step used
        with warnings.catch_warnings():  # a skipped step is not an ordering mistake
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.global_step += 1

    def _report_skipped_step(self, window_bad: dict) -> None:
        """Warn about a skipped step; NonFiniteLossError after ``max_bad_steps`` in a row."""
        cfg = self.config
        comps_msg = ", ".join(f"{k}={v:.4g}" for k, v in window_bad.items())
        if self.accelerator.num_processes > 1:
            comps_msg = f"on at least one process; here {comps_msg}"
        if self.consecutive_bad >= cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"loss was NaN/inf for {self.consecutive_bad} optimizer steps in a row "
                f"(last at step {self.global_step}, epoch {self.epoch}; {comps_msg}). "
                f"Try a lower learning rate (lr={cfg.lr}), enable gradient clipping "
                f"(clip_grad_norm), or check the data for NaN/inf values and broken labels."
            )
        if self.is_main:
            logger.warning("non-finite loss at step %d (%s): step skipped", self.global_step, comps_msg)

    def _stop_requested(self) -> bool:
        """Whether a signal (or request_stop) reached any rank: they may see it at different times, so agree."""
        acc = self.accelerator
        stop_t = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=acc.device)
        if acc.num_processes > 1:
            stop_t = acc.reduce(stop_t, reduction="sum")
        return bool(stop_t.item() > 0)

    def _train_epoch(self) -> tuple[bool, bool, dict]:
        """Run (the rest of) the current epoch. Returns (epoch finished, interrupted, stats)."""
        cfg, acc = self.config, self.accelerator
        if self.batch_in_epoch >= self.batches_per_epoch:
            return True, False, {"time": 0.0, "samples": 0, "last_row": {}}
        self._set_epoch(self.epoch)
        loader = self.train_loader
        if self.batch_in_epoch > 0:
            loader = acc.skip_first_batches(self.train_loader, self.batch_in_epoch)
        self.model.train()
        sums: dict[str, Tensor] = {}
        count = 0  # finite micro-batches since the last log
        samples_log = 0
        samples_epoch = 0
        t_log = time.time()
        t_epoch = 0.0
        t_step = time.time()
        window_bad: dict | None = None
        last_row: dict = {}
        interrupted = False
        distributed = acc.num_processes > 1
        it = iter(loader)
        try:
            for batch in it:
                with acc.accumulate(self.model):
                    out = self._call_loss(batch)
                    loss, comps = _split_loss(out)
                    # the skip decision must agree across ranks, or DDP's gradient all-reduce would hang
                    bad_t = (~torch.isfinite(loss.detach())).any().float().reshape(1)
                    bad = bool((acc.reduce(bad_t, reduction="sum") if distributed else bad_t).item() > 0)
                    if bad:
                        if window_bad is None:
                            window_bad = {
                                "loss": _to_float(loss),
                                **{k: _to_float(v) for k, v in comps.items()},
                            }
                    else:
                        acc.backward(loss)
                        self._accumulate(sums, loss, comps)
                        count += 1
                    n = self.batch_size_fn(batch)
                    samples_log += n
                    samples_epoch += n
                    synced = acc.sync_gradients
                    if synced:
                        self._optimizer_step(skip=window_bad is not None)
                self.batch_in_epoch += 1
                if not synced:
                    continue
                # ---- after an optimizer step (or a skipped one)
                t_epoch += time.time() - t_step
                if window_bad is not None:
                    self._report_skipped_step(window_bad)
                    window_bad = None
                if self._pbar is not None:
                    self._pbar.update(1)
                if self.global_step % max(cfg.log_every, 1) == 0 or self.global_step >= self.total_steps:
                    last_row = self._log_step(sums, count, samples_log, t_log)
                    sums, count, samples_log, t_log = {}, 0, 0, time.time()
                self._emit("step_end", {"step": self.global_step, "epoch": self.epoch, "lr": self.lr})
                end_of_epoch = self.batch_in_epoch >= self.batches_per_epoch
                if self._stop_requested():
                    interrupted = True
                    break
                if self.global_step >= self.total_steps:
                    break
                if (
                    cfg.checkpoint_every > 0
                    and self.global_step % cfg.checkpoint_every == 0
                    and not end_of_epoch
                ):
                    self.save_checkpoint()
                t_step = time.time()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            end = getattr(loader, "end", None)
            if end is not None:
                end()
        ended = self.batch_in_epoch >= self.batches_per_epoch
        if not interrupted and not ended and self.global_step < self.total_steps:
            raise RuntimeError(
                f"the data loader stopped after {self.batch_in_epoch} of {self.batches_per_epoch} batches"
            )
        return ended, interrupted, {"time": t_epoch, "samples": samples_epoch, "last_row": last_row}
