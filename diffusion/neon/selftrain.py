"""Neon self-training: sample from the base diffusion model, then fine-tune it on its own samples.

The fine-tuning uses the standard denoising loss (the scheduler's ``prediction_type``: epsilon, v or x0), or for SD3
and Flux transformers the rectified-flow loss of :mod:`diffusion.neon.flow`, through the shared engine
``vision.engine.Trainer``, which saves a checkpoint every ``save_every`` steps. The run folder
follows ``vision.engine.run``: a used folder makes ``NAME2`` unless ``resume`` (continue ``train/``'s checkpoints)
or ``exist_ok`` (reuse it, removing the earlier run's logs and checkpoints).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from vision.io import write_text_atomic

if TYPE_CHECKING:
    from vision.engine import RunOptions, TrainConfig

__all__ = ["ConditioningError", "SelfTrainConfig", "denoising_loss", "is_dit", "load_pipeline",
           "num_classes", "sample_images", "self_train", "trainable_component"]

logger = logging.getLogger("negvision.neon")


class ConditioningError(ValueError):
    """Prompts or class labels the pipeline cannot take, or needs and did not get (a usage error on the CLI)."""


def load_pipeline(path: str | os.PathLike, device: torch.device | str | None = None) -> Any:
    """A diffusers pipeline from a local folder (never downloads), moved to ``device``."""
    from diffusion.folders import check_pipeline_folder, null_components, pipeline_class
    from vision.io import error_line

    path = Path(path)
    index = check_pipeline_folder(path)  # no model_index.json, a component missing, weights cut short: named
    cls = pipeline_class(str(index.get("_class_name", "")))
    try:
        pipe = cls.from_pretrained(str(path), local_files_only=True, **null_components(index, cls))
    except (OSError, ValueError, EnvironmentError) as e:  # noqa: UP024
        raise ValueError(f"could not load the pipeline folder '{path}' ({error_line(e, 300)})") from None
    if device is not None:
        pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _requires(fn: Callable, name: str) -> bool:
    p = inspect.signature(fn).parameters.get(name)
    return p is not None and p.default is inspect.Parameter.empty


def num_classes(pipe: Any) -> int:
    """Number of classes of a class-conditional pipeline's denoiser (DiT: ``num_embeds_ada_norm``; UNet2DModel:
    ``num_class_embeds``)."""
    _, den = trainable_component(pipe)
    n = getattr(den.config, "num_embeds_ada_norm", None) or getattr(den.config, "num_class_embeds", None)
    if not n:
        raise ConditioningError(f"{type(pipe).__name__}: cannot tell the number of classes; give class_labels")
    return int(n)


def _class_conds(pipe: Any, class_labels: Sequence[int] | None, indices: Iterable[int]) -> list[int]:
    """The class label of each sample index: ``class_labels`` cycled, by default every class in turn."""
    labels = list(class_labels) if class_labels else list(range(num_classes(pipe)))
    return [int(labels[i % len(labels)]) for i in indices]


def is_dit(module: nn.Module) -> bool:
    """A DiT-style class-conditional latent transformer (adaLN-Zero with a class-label embedding)."""
    cfg = getattr(module, "config", None)
    return (type(module).__name__ in ("DiTTransformer2DModel", "Transformer2DModel")
            and getattr(cfg, "norm_type", "ada_norm_zero") == "ada_norm_zero"
            and getattr(cfg, "num_embeds_ada_norm", None) is not None)


@torch.no_grad()
def sample_images(
    pipe: Any,
    num_samples: int,
    *,
    batch_size: int = 64,
    num_inference_steps: int | None = None,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    progress: bool = False,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
) -> tuple[Tensor, list[Any]]:
    """``num_samples`` images [N, C, H, W] in [0, 1] from any diffusers pipeline, plus the condition of each.

    Unconditional pipelines get ``batch_size``; text-to-image ones cycle through ``prompts``; class-conditional
    ones through ``class_labels``. Only arguments the pipeline accepts are passed; ``height``, ``width`` and
    ``max_sequence_length`` (None: the pipeline's defaults) are an error for a pipeline that takes none.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    call = pipe.__call__
    device = getattr(pipe, "device", torch.device("cpu"))
    conds: list[Any] = []
    images: list[Tensor] = []
    n_batches = math.ceil(num_samples / batch_size)
    it = range(n_batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", unit="batch")
    for b in it:
        n = min(batch_size, num_samples - b * batch_size)
        idx = list(range(b * batch_size, b * batch_size + n))
        kwargs: dict[str, Any] = {}
        if prompts:
            if not _accepts(call, "prompt"):
                raise ConditioningError(f"{type(pipe).__name__} takes no prompt; drop --prompts")
            cond = [prompts[i % len(prompts)] for i in idx]
            kwargs["prompt"] = cond
        elif class_labels or _requires(call, "class_labels"):
            if not _accepts(call, "class_labels"):
                raise ConditioningError(f"{type(pipe).__name__} takes no class_labels")
            cond = _class_conds(pipe, class_labels, idx)
            kwargs["class_labels"] = cond
        else:
            if _accepts(call, "prompt") and not _accepts(call, "batch_size"):
                raise ConditioningError(f"{type(pipe).__name__} is text-conditioned: give prompts")
            if _accepts(call, "batch_size"):
                kwargs["batch_size"] = n
            elif _accepts(call, "num_images_per_prompt"):
                kwargs["num_images_per_prompt"] = n
            cond = [None] * n
        if num_inference_steps is not None and _accepts(call, "num_inference_steps"):
            kwargs["num_inference_steps"] = int(num_inference_steps)
        if guidance_scale is not None and _accepts(call, "guidance_scale"):
            kwargs["guidance_scale"] = float(guidance_scale)  # Flux.1-dev: the distilled guidance embedding
        for key, value in (("height", height), ("width", width), ("max_sequence_length", max_sequence_length)):
            if value is not None:
                if not _accepts(call, key):
                    raise ConditioningError(f"{type(pipe).__name__} takes no {key}")
                kwargs[key] = int(value)
        gen_device = device.type if isinstance(device, torch.device) and device.type == "cuda" else "cpu"
        kwargs["generator"] = torch.Generator(gen_device).manual_seed(int(seed) * 1_000_003 + b)
        kwargs["output_type"] = "np"
        out = pipe(**kwargs)
        arr = out.images if hasattr(out, "images") else out[0]
        t = torch.as_tensor(np.asarray(arr), dtype=torch.float32)
        if t.dim() == 3:
            t = t.unsqueeze(-1)
        images.append(t.permute(0, 3, 1, 2).clamp(0, 1)[:n])
        conds.extend(cond)
    return torch.cat(images)[:num_samples], conds[:num_samples]


def trainable_component(pipe: Any, component: str | None = None) -> tuple[str, nn.Module]:
    """Name and module of the denoiser to fine-tune (``unet`` or ``transformer`` unless given)."""
    names = [component] if component else ["unet", "transformer"]
    for name in names:
        mod = getattr(pipe, name, None)
        if isinstance(mod, nn.Module):
            return name, mod
    raise ValueError(
        f"{type(pipe).__name__} has no component {' or '.join(repr(n) for n in names)} to fine-tune"
    )


def denoising_loss(scheduler: Any, *, class_conditional: bool = False,
                   text_conditional: bool = False) -> Callable[[nn.Module, Any], dict]:
    """loss_fn(model, batch) of DDPM training: noise x0 at a random t and regress the scheduler's target."""
    num_t = int(scheduler.config.num_train_timesteps)
    pred_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if pred_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type '{pred_type}'")

    def loss_fn(model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        noise = torch.randn_like(x0)
        t = torch.randint(0, num_t, (x0.shape[0],), device=x0.device)
        # forward process q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        x_t = scheduler.add_noise(x0, noise, t)
        kwargs = {}
        if class_conditional:
            kwargs["class_labels"] = batch[1]
        if text_conditional:  # batch = (latents, text embeddings of each sample's prompt)
            kwargs["encoder_hidden_states"] = batch[1]
        pred = model(x_t, t, **kwargs).sample
        if pred.shape[1] == 2 * x0.shape[1]:
            # learned variance (DiT, improved DDPM): the first half is the mean prediction; the variance half gets
            # no loss here (no VLB term), and diffusers' samplers discard it
            pred = pred[:, : x0.shape[1]]
        if pred_type == "epsilon":
            target = noise
        elif pred_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        return {"loss": nn.functional.mse_loss(pred.float(), target.float())}

    return loss_fn


@torch.no_grad()
def _encode_text_to_image_data(pipe: Any, x0: Tensor, prompts: Sequence[Any], batch_size: int = 16
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """VAE latents of the samples, text embeddings of the distinct prompts, and each sample's prompt index."""
    if any(p is None for p in prompts):
        raise ValueError("every sample of a text-to-image pipeline needs its prompt")
    lat = _vae_latents(pipe, x0, batch_size)
    uniq = sorted(set(str(p) for p in prompts))
    tok = pipe.tokenizer(uniq, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    emb = pipe.text_encoder(tok.input_ids.to(next(pipe.text_encoder.parameters()).device))[0].cpu()
    where = {p: i for i, p in enumerate(uniq)}
    idx = torch.tensor([where[str(p)] for p in prompts], dtype=torch.long)
    return lat, emb, idx


@torch.no_grad()
def _vae_latents(pipe: Any, x0: Tensor, batch_size: int = 16) -> Tensor:
    """z_0 = scaling_factor * E(x) for images x0 in [-1, 1], as Stable Diffusion and DiT training do."""
    dev = next(pipe.vae.parameters()).device
    scale = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    lat = []
    for i in range(0, len(x0), batch_size):
        lat.append(pipe.vae.encode(x0[i:i + batch_size].to(dev)).latent_dist.sample().cpu() * scale)
    return torch.cat(lat)


class _TextCondData(torch.utils.data.Dataset):
    """(latent, text embedding of its prompt) pairs; embeddings stored once per distinct prompt."""

    def __init__(self, latents: Tensor, emb: Tensor, idx: Tensor):
        self.latents, self.emb, self.idx = latents, emb, idx

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.latents[i], self.emb[self.idx[i]]


class Repeated(torch.utils.data.Dataset):
    """``dataset`` cycled to ``length`` items (the engine's sampler shuffles the indices)."""

    def __init__(self, dataset: Any, length: int):
        self.dataset, self.length = dataset, max(int(length), len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i % len(self.dataset)]


# the task's defaults of the TrainConfig fields left None (TrainConfig.resolved), and of max_steps
TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "scheduler": "constant",
                                  "batch_size": 32}
DEFAULT_MAX_STEPS = 1000


@dataclass
class SelfTrainConfig:
    """The method settings of Neon self-training (what is sampled, and how the samples are taken).

    Attributes:
        num_samples: images sampled from the base model (unused when ``samples`` is given).
        save_every: keep a checkpoint every k optimizer steps (``train/checkpoints/step-XXXXXXX``); 0: the end only.
        sample_batch_size: images per sampling call (also the batch of the VAE / text encoding).
        num_inference_steps: sampler (denoising) steps per sample; None: the pipeline's default.
        prompts: text-to-image pipelines (SD, SD3, Flux): the prompts, cycled over the samples.
        class_labels: class-conditional pipelines (DiT, class UNets): the labels, cycled; None: every class in turn.
        guidance_scale: sampling guidance (Flux-dev: its distilled guidance, also used while fine-tuning); None: the
            pipeline's default.
        component: the pipeline component fine-tuned; None: ``unet`` or ``transformer``.
        samples: pre-made samples [N, C, H, W] in [0, 1] to fine-tune on instead of sampling (their conditions:
            ``prompts`` / ``class_labels`` cycled).
        height, width, max_sequence_length: passed to the sampling pipeline when given (Flux's default is 1024 x
            1024 for a real VAE) and used for the prompt embeddings of the fine-tuning; None: the pipeline's
            defaults.
    """

    num_samples: int = 1000
    save_every: int = 0
    sample_batch_size: int = 64
    num_inference_steps: int | None = None
    prompts: Sequence[str] | None = None
    class_labels: Sequence[int] | None = None
    guidance_scale: float | None = None
    component: str | None = None
    samples: Tensor | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None


def self_train(
    model: str | os.PathLike,
    config: SelfTrainConfig | None = None,
    train: TrainConfig | None = None,
    run: RunOptions | None = None,
) -> dict[str, Any]:
    """Sample ``config.num_samples`` images from pipeline ``model``, fine-tune its denoiser on them for
    ``train.max_steps`` steps.

    Args:
        model: a local diffusers pipeline folder.
        config: the method settings (:class:`SelfTrainConfig`); None: its defaults.
        train: how the denoiser is optimised (:class:`TrainConfig`): ``max_steps`` (None: 1000; self-training counts
            steps, so ``epochs`` alone is refused), ``batch_size``, ``seed`` (sampling, VAE posterior and training
            draws), ``mixed_precision``, ``deterministic``, and the optimiser fields, those left None taking the
            task's defaults :data:`TRAIN_DEFAULTS` (AdamW, lr 1e-4, no weight decay, constant schedule, batch 32).
            None: ``TrainConfig()``. Set here: ``out_dir``, ``device``, ``progress``,
            ``num_workers`` (from ``run``), ``checkpoint_every`` and ``keep_last`` (from ``config.save_every``: every
            saved step is kept), ``log_every`` (max(1, min(50, max_steps // 10))), ``eval_every`` 0.
        run: the run folder ``run.out``, ``resume``, ``exist_ok``, ``device``, ``workers``, ``progress``, and
            ``config`` (the command's options, written to ``config.yaml``); None: :class:`RunOptions` defaults.
            ``keep_last`` and ``skip_bad`` are not used.

    Writes ``out/samples.png`` (a grid), ``out/train/`` (engine logs and checkpoints every ``save_every`` steps),
    and ``out/pipeline/`` (the self-trained pipeline, ready for ``neon merge``); ``info["out"]`` is the run folder
    used (``run.out``, or ``out2``... when ``run.out`` already holds a run). ``run.resume``: True continues
    ``train/checkpoints/last`` (the samples are drawn again with the same seed), a path continues that checkpoint
    folder.

    SD3 (``SD3Transformer2DModel``) and Flux (``FluxTransformer2DModel``) pipelines are fine-tuned with the
    rectified-flow loss of :mod:`diffusion.neon.flow` (logit-normal sigma, velocity target, each pipeline's timestep
    convention; a guidance-distilled Flux trains at the sampling ``guidance_scale``, the pipeline's default when not
    given). The whole transformer is fine-tuned: LoRA (via ``peft``) is left out, as peft is not installed offline
    here.
    """
    from torch.utils.data import TensorDataset

    from vision.device import pick_device
    from vision.engine import RunOptions, TrainConfig, Trainer
    from vision.engine.run import clear_run_outputs, prepare_run_dir, write_run_config
    from vision.viz import image_grid, save_image

    config = config if config is not None else SelfTrainConfig()
    run = run if run is not None else RunOptions()
    train = train if train is not None else TrainConfig()
    if train.max_steps is None and train.epochs is not None:
        raise ValueError("self_train counts optimizer steps: set TrainConfig.max_steps, not epochs")
    train = train.resolved(**TRAIN_DEFAULTS)
    steps = int(train.max_steps) if train.max_steps is not None else DEFAULT_MAX_STEPS
    out_dir, resume, exist_ok = run.out, run.resume, run.exist_ok
    prompts, class_labels, guidance_scale = config.prompts, config.class_labels, config.guidance_scale
    max_sequence_length, sample_batch_size = config.max_sequence_length, config.sample_batch_size
    seed, progress = train.seed, run.progress
    if steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {steps}")
    dev = pick_device(run.device)
    pipe = load_pipeline(model, dev)
    name, denoiser = trainable_component(pipe, config.component)
    from diffusers import UNet2DConditionModel, UNet2DModel

    from .flow import check_flow_pipeline, flow_family, flow_training_setup

    flow = flow_family(denoiser)  # "sd3" / "flux": a rectified-flow transformer
    text_cond = isinstance(denoiser, UNet2DConditionModel)
    dit = is_dit(denoiser)
    if flow:
        check_flow_pipeline(pipe, flow)  # the VAE and the text encoders
        if not prompts:
            raise ConditioningError("a text-to-image pipeline needs a prompt list (--prompts FILE, one prompt a line)")
    elif dit:
        # DiT: class-conditional transformer in a VAE latent space
        if getattr(pipe, "vae", None) is None:
            raise NotImplementedError("self-training a DiT transformer needs a pipeline with a 'vae'")
        if prompts:
            raise ConditioningError(f"{type(pipe).__name__} is class-conditional: give class labels, not prompts")
    elif text_cond:
        # Stable-Diffusion-style text-to-image: latent space (VAE) + text encoder conditioning
        for need in ("vae", "text_encoder", "tokenizer"):
            if getattr(pipe, need, None) is None:
                raise NotImplementedError(f"self-training a UNet2DConditionModel needs a pipeline with '{need}'")
        if not prompts:
            raise ConditioningError("a text-to-image pipeline needs a prompt list (--prompts FILE, one prompt a line)")
    else:
        if getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None:
            raise NotImplementedError(
                "self-training latent pipelines without text conditioning is not supported yet; pixel-space "
                "UNet2DModel pipelines (DDPM/DDIM) and Stable-Diffusion-style text-to-image pipelines are"
            )
        if not isinstance(denoiser, UNet2DModel):
            raise NotImplementedError(
                f"self-training a {type(denoiser).__name__} is not supported yet (UNet2DModel, "
                "UNet2DConditionModel, DiT); sample and fine-tune with your own script, then use `negvision neon merge`"
            )
    class_cond = dit or getattr(denoiser.config, "num_class_embeds", None) is not None

    # the run folder, decided once the model and its conditioning are known to work
    if resume is True and not (Path(out_dir) / "train" / "checkpoints").is_dir():
        raise FileNotFoundError(f"cannot resume {out_dir}: it holds no checkpoints "
                                f"({Path(out_dir) / 'train' / 'checkpoints'}); start without --resume")
    out = prepare_run_dir(out_dir, resume=resume, exist_ok=exist_ok)
    if exist_ok and not resume and (out / "train").is_dir():
        clear_run_outputs(out / "train")
    if run.config is not None:
        write_run_config(out, {**run.config, "_resumed": bool(resume)})

    samples = config.samples
    if samples is None:
        samples, conds = sample_images(
            pipe, config.num_samples, batch_size=sample_batch_size, num_inference_steps=config.num_inference_steps,
            seed=seed, prompts=prompts, class_labels=class_labels, guidance_scale=guidance_scale,
            progress=progress, height=config.height, width=config.width, max_sequence_length=max_sequence_length,
        )
    else:
        if prompts:
            conds = [prompts[i % len(prompts)] for i in range(len(samples))]
        elif class_cond:
            conds = _class_conds(pipe, class_labels, range(len(samples)))
        else:
            conds = [None] * len(samples)
    save_image(image_grid(list(samples[:64])), out / "samples.png")
    x0 = samples.to(torch.float32) * 2.0 - 1.0  # pipelines output [0, 1]; the model is trained on [-1, 1]
    torch.manual_seed(seed)  # the VAE posterior samples below: the same latents when a run is resumed
    flow_info: dict[str, Any] = {}
    if flow:
        data, flow_loss, flow_info = flow_training_setup(
            pipe, flow, x0, conds, device=dev, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
            batch_size=sample_batch_size)
        x0 = data.latents
    elif text_cond:
        x0, emb, idx = _encode_text_to_image_data(pipe, x0, conds, batch_size=sample_batch_size)
        data = _TextCondData(x0, emb, idx)
    elif class_cond:
        if any(c is None for c in conds):
            raise ConditioningError(f"a class-conditional {type(denoiser).__name__} needs class_labels")
        if dit:
            x0 = _vae_latents(pipe, x0, batch_size=sample_batch_size)
        data = TensorDataset(x0, torch.as_tensor(conds, dtype=torch.long))
    else:
        data = TensorDataset(x0)
    # one engine "epoch" spans all steps, so checkpoints land every save_every steps and at the end only
    data = Repeated(data, steps * int(train.batch_size))

    if flow:
        loss_fn = flow_loss
    else:
        from diffusers import DDPMScheduler

        train_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        loss_fn = denoising_loss(train_sched, class_conditional=class_cond, text_conditional=text_cond)
    cfg = dataclasses.replace(train, **{
        **run.train_fields(out / "train"),
        "max_steps": steps,
        "checkpoint_every": int(config.save_every),
        "keep_last": 10**6 if config.save_every else 1,  # keep every saved step as checkpoints/step-XXXXXXX
        "device": str(dev),
        "log_every": max(1, min(50, steps // 10)),
        "eval_every": 0,
    })
    denoiser.train()
    trainer = Trainer(
        denoiser, data, cfg,
        loss_fn=loss_fn,
        extra_config={"neon": {"model": str(model), "num_samples": len(x0), **flow_info}},
    )
    summary = trainer.fit(resume=resume)
    tuned = trainer.unwrapped_model
    tuned.eval()
    setattr(pipe, name, tuned)
    pipe.register_modules(**{name: tuned})
    pipe.to("cpu")
    pipe.save_pretrained(str(out / "pipeline"), safe_serialization=True)
    info = {
        "out": str(out),
        "base": str(model),
        "pipeline": str(out / "pipeline"),
        "component": name,
        "num_samples": len(x0),
        "steps": summary["steps"],
        "last_loss": summary.get("last_loss"),
        "checkpoints": sorted(str(p) for p in (out / "train" / "checkpoints").glob("step-*")),
    }
    write_text_atomic(out / "selftrain.json", json.dumps(info, indent=2))
    return info
