"""``defect train --method patchcore``: a good-images-only anomaly scorer (PatchCore-style, see ``patchcore``) as a
run folder that ``defect eval`` / ``defect predict`` read like a SegDecNet run.

It is the baseline inspection engineers reach for when defects are rare, and the mode for users with no defective
images at all: only the good training images build the memory bank. The validation images (a held-out share, or
``--val-data``) set the decision threshold; the test split is evaluated at the end and chooses nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from vision.engine.config import RunOptions
from vision.io import write_json_atomic

from .config import DefectDataConfig
from .data import MaskTargets, load_defect_dataset, validation_and_test, validation_record
from .evaluate import evaluate_segdec, public_metrics, record_validation, save_eval_outputs
from .spec import SPEC_FILE

log = logging.getLogger(__name__)


@dataclass
class PatchCoreConfig(DefectDataConfig):
    """The good-images-only scorer's settings (the data settings: :class:`DefectDataConfig`'s; the validation
    images set the decision threshold).

    Attributes:
        backbone: the frozen feature extractor (None: the offline ImageNet EfficientNet-Lite0).
        pretrained: its weights (None: True; random features make a poor memory bank), False, or a weights file.
        coreset_ratio: the share of good-image patch features the memory bank keeps (greedy coreset).
        batch: images per feature-extraction batch.
        seed: the coreset's random start.
    """

    backbone: str | None = None
    pretrained: bool | str | None = None
    coreset_ratio: float = 0.1
    batch: int = 8
    seed: int = 0


def train_patchcore(data: str | Path, config: PatchCoreConfig | None = None,
                    run: RunOptions | None = None) -> dict[str, Any]:
    """Fit a PatchCore scorer on the good training images of a defect data set; writes the run folder ``run.out``.

    Returns a summary with the fit report, the validation figures and (``config.final_eval``) the test split's
    evaluation. ``run`` (:class:`RunOptions`): folder, device, workers, bad files, progress, config file (there is
    no training loop to resume)."""
    import torch

    from vision.device import pick_device
    from vision.engine import save_checkpoint_atomic
    from vision.engine.run import main_process_first, prepare_run_dir, record_skipped, write_run_config

    from .data import detect_layout
    from .patchcore import PatchCore
    from .train import WEAK_BACKBONE  # the offline ImageNet trunk, as for labels-only SegDecNet

    cfg, run = config or PatchCoreConfig(), run or RunOptions()
    seed, batch, progress = cfg.seed, cfg.batch, run.progress
    t0 = time.perf_counter()
    layout = detect_layout(data) if cfg.dataset_kind == "auto" else cfg.dataset_kind
    kw = dict(skip_bad=run.skip_bad, dagm_class=cfg.dagm_class, fold=cfg.fold, cache=cfg.cache,
              targets=MaskTargets(seed=seed))
    with main_process_first():
        train_ds = load_defect_dataset(data, "train", layout, img_size=cfg.img_size, channels=cfg.channels,
                                       progress=progress, **kw)
        train_ds, val_ds, eval_ds = validation_and_test(data, layout, train_ds, val_data=cfg.val_data,
                                                        val_split=cfg.val_split, progress=progress, **kw)
    good = [i for i, lab in enumerate(train_ds.labels) if lab == 0]
    if len(good) < 2:
        raise ValueError(f"{data}: the training split has {len(good)} defect-free image(s); PatchCore builds its "
                         "memory bank from good images and needs at least 2")
    out = prepare_run_dir(run.out, exist_ok=run.exist_ok)
    if run.config is not None:
        write_run_config(out, run.config)
    record_skipped(out, {"train": train_ds.bad, **({"test": eval_ds.bad} if eval_ds is not None else {})})

    dev = pick_device(run.device)
    backbone = cfg.backbone or WEAK_BACKBONE
    pretrained = True if cfg.pretrained is None else cfg.pretrained
    coreset_ratio = cfg.coreset_ratio
    torch.manual_seed(seed)
    model = PatchCore(train_ds.channels, backbone=backbone, pretrained=pretrained, coreset_ratio=coreset_ratio)
    model.to(dev)
    good_ds = train_ds.subset(good, "train")
    loader = DataLoader(good_ds, batch_size=batch, shuffle=False, num_workers=run.workers)
    report = model.fit(({"image": b["image"].to(dev)} for b in loader), seed=seed, progress=progress)
    model.eval()

    spec: dict[str, Any] = {
        "format": "negvision.segdec/1", "method": "patchcore", "weights": "last",
        "model": {**model.config, "bank_size": int(model.memory_bank.shape[0])},
        "img_size": list(train_ds.img_size), "channels": train_ds.channels, "dataset_kind": layout,
        "data": str(data), "pretrained_backbone": pretrained if isinstance(pretrained, bool) else str(pretrained),
        "train": {"method": "patchcore", "good_images": len(good), "seed": seed, "coreset_ratio": coreset_ratio,
                  "fit": {k: v for k, v in report.items() if not isinstance(v, list)},
                  "validation": validation_record(val_ds, cfg.val_data, cfg.val_split)},
    }
    save_checkpoint_atomic(out / "checkpoints" / "last", model, None,
                           meta={"step": 0, "method": "patchcore", "segdec": spec})
    write_json_atomic(out / SPEC_FILE, spec)
    summary: dict[str, Any] = {"out": str(out), "method": "patchcore", "fit": spec["train"]["fit"],
                               "train_data": train_ds.summary()}
    if val_ds is not None and sum(val_ds.labels) > 0 and sum(val_ds.labels) < len(val_ds):
        summary["validation"] = record_validation(model, val_ds, out, spec, batch=batch)
    if cfg.final_eval and eval_ds is not None:
        res = evaluate_segdec(model, eval_ds, batch=batch)
        summary["eval"] = public_metrics(res)
        summary["files"] = save_eval_outputs(res, eval_ds, out / "eval", max_images=cfg.max_images)
    summary["time_s"] = time.perf_counter() - t0
    write_json_atomic(out / "train_summary.json", summary)
    return summary
