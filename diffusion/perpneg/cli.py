"""`negvision generate`: image, views, 3d with Perp-Neg. torch/diffusers are imported inside the commands only."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer

from vision import cli_options as opt
from vision.cli_common import fail, usage_error

generate_app = typer.Typer(
    help="Perp-Neg guided generation: text-to-image with negative prompts, view-conditioned images, text-to-3D.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

class ViewSchedule(str, enum.Enum):
    """How the view prompts' Perp-Neg weights follow the azimuth (``diffusion.perpneg.views``)."""

    threestudio = "threestudio"
    dreamfusion = "dreamfusion"


SCHEDULE_HELP = "Negative-weight schedule over the azimuth: threestudio or dreamfusion (stable-dreamfusion)."
AMP_HELP = ("Pipeline precision: auto (fp16 on a GPU, fp32 on the CPU), no (fp32), fp16 (GPU only), bf16.")

MODEL_HELP = ("Stable Diffusion 1.x/2.x checkpoint (SDXL, SD3 and Flux too for `image`): hub id (in the local HF "
              "cache) or a local pipeline folder.")


def _pipeline_index(path: Path, model: str, offline: bool) -> dict:
    """model_index.json of a pipeline folder or hub id ({} when it cannot be read)."""
    try:
        if path.exists():
            return dict(json.loads((path / "model_index.json").read_text()))
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(model, local_files_only=offline))
    except Exception:  # noqa: BLE001 - unreadable: loading below gives the clear error
        return {}


def _check_local_pipeline(path: Path) -> None:
    """``diffusion.folders.check_pipeline_folder``, failing with its message (exit 1)."""
    from diffusion.folders import check_pipeline_folder
    from vision.weights_io import CheckpointCorruptError

    try:
        check_pipeline_folder(path)
    except CheckpointCorruptError as e:
        fail(f"{e} (copy or download the pipeline again)")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def looks_local(model: str) -> bool:
    """A --model value that can only be a path: ./x, ../x, /x, ~/x, C:\\x, or more than one '/' (hub ids are
    ORG/NAME)."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
            or (len(model) > 1 and model[1] == ":"))


# each family's Perp-Neg pipeline class (diffusion.folders.NEGVISION_PIPELINES says where it lives) and its name
FAMILIES: dict[str, tuple[str, str]] = {
    "sd": ("PerpNegStableDiffusionPipeline", "Stable Diffusion 1.x / 2.x"),
    "sdxl": ("PerpNegStableDiffusionXLPipeline", "SDXL"),
    "sd3": ("PerpNegStableDiffusion3Pipeline", "SD3"),
    "flux": ("PerpNegFluxPipeline", "Flux"),
}
SD_ONLY = ("sd",)


CLASS_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# --guidance when not given: diffusers' own default of each family (Flux: a true-CFG scale, as in its docs)
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "flux": 4.0}


def pipeline_family(class_name: str) -> str | None:
    """The family of a pipeline class name (a ``PerpNeg`` subclass counts as its parent); '' when unknown (loaded as
    Stable Diffusion, whose loader then names the problem), None for another diffusers pipeline."""
    if not class_name:
        return ""
    return CLASS_FAMILY.get(class_name.removeprefix("PerpNeg"))


def load_pipeline(model: str, device: str | None = None, allow: tuple[str, ...] = SD_ONLY, amp: str = "auto"):
    """Load the Perp-Neg pipeline of ``model``'s family (``FAMILIES``: SD 1.x/2.x, SDXL, SD3, Flux, told apart by
    model_index.json) from a local folder or a cached hub id, in the precision ``amp`` (auto: fp16 on a GPU, fp32
    otherwise); one clear error (exit 1) when missing, exit 2 for a family not in ``allow`` or for fp16 on the CPU."""
    import os

    import torch

    from diffusion.folders import null_components, pipeline_class
    from vision.device import pick_device

    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        fail(f"'{model}' is a folder without model_index.json; pass a diffusers pipeline folder "
             "(e.g. one saved with save_pretrained or downloaded with `huggingface-cli download ID --local-dir DIR`)")
    if path.exists():
        _check_local_pipeline(path)
    dev = torch.device(device) if device else pick_device()
    amp = getattr(amp, "value", amp)
    if amp == "fp16" and dev.type == "cpu":
        usage_error("--amp fp16 needs a GPU; on the CPU use --amp bf16 or --amp no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        amp, torch.float16 if dev.type == "cuda" else torch.float32)
    if not path.exists() and looks_local(model):
        fail(f"--model {model}: no such folder (a local diffusers pipeline folder was expected; a hub id looks "
             "like ORG/NAME)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    index = _pipeline_index(path, model, offline)
    class_name = str(index.get("_class_name", ""))
    family = pipeline_family(class_name)
    if family is None:
        usage_error(f"'{model}' holds a {class_name}; Perp-Neg pipelines exist for "
                    + ", ".join(v[1] for v in FAMILIES.values()) + " (diffusers' modular pipelines take "
                    "diffusion.perpneg.guider.PerpNegGuidance)")
    family = family or "sd"
    if family not in allow:
        usage_error(f"'{model}' holds a {FAMILIES[family][1]} pipeline; this command needs "
                    + " or ".join(FAMILIES[f][1] for f in allow)
                    + " (SDXL, SD3 and Flux work with `negvision generate image`)")
    cls = pipeline_class(FAMILIES[family][0])
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    extra.update(null_components(index, cls))  # SD3 saved without its T5 encoder, no image encoder ...
    try:
        pipe = cls.from_pretrained(str(path) if path.exists() else model, dtype=dtype,
                                   local_files_only=offline or path.exists(), **extra)
    except (OSError, ValueError, EnvironmentError) as e:  # noqa: UP024
        if path.exists():
            from vision.io import error_line

            fail(f"could not load the pipeline folder '{model}' ({error_line(e, 300)})")
        fail(f"could not load the model '{model}' ({type(e).__name__}). Offline, pass --model a local folder holding a "
             f"diffusers pipeline (model_index.json and its components: unet/ or transformer/, vae/, text_encoder/, "
             f"tokenizer/, scheduler/ ...), e.g. `huggingface-cli download {model} --local-dir "
             f"weights/{Path(model).name}` on a machine with network, then --model weights/... (see weights/README.md)")
    pipe.set_progress_bar_config(disable=True)
    pipe.negvision_family = family
    return pipe.to(dev)


def _grid(images: list, cols: int | None = None):
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        canvas.paste(im, ((i % cols) * w, (i // cols) * h))
    return canvas


def _save(out: Path, images: list, settings: dict, names: list[str] | None = None) -> None:
    """Each image, their grid and ``settings.json`` into ``out`` (atomic writes)."""
    from vision.io import write_text_atomic
    from vision.viz import save_image

    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        save_image(im, out / f"{names[i] if names else f'image_{i:03d}'}.png")
    save_image(_grid(images), out / "grid.png")
    write_text_atomic(out / "settings.json", json.dumps(settings, indent=2))


def _weights(names: list[str], weights: list[float] | None, what: str) -> list[float]:
    weights = list(weights or [])
    if len(weights) == 0:
        return [1.0] * len(names)
    if len(weights) == 1 and len(names) > 1:
        return weights * len(names)
    if len(weights) != len(names):
        usage_error(f"{len(weights)} --{what}-weight values for {len(names)} --{what} prompts")
    return weights


class GuidanceMode(str, enum.Enum):
    """How a guidance-distilled model (Flux-dev) is guided: auto (true-CFG passes when --negative or --uncond is
    given, else the distilled embedding alone), cfg (always true-CFG passes), distilled (one pass; no negatives)."""

    auto = "auto"
    cfg = "cfg"
    distilled = "distilled"


def _family_kwargs(pipe, family: str, *, guidance: float, mode: GuidanceMode, distilled_guidance: float,
                   negatives: bool, uncond: str, positives: bool, batch: int | None) -> dict:
    """The family-specific arguments of the pipeline call (what --guidance means, the model batch chunking)."""
    if family in ("sd", "sdxl"):
        if mode is GuidanceMode.distilled:
            usage_error(f"--guidance-mode distilled is for guidance-distilled models (Flux-dev); this is "
                        f"{FAMILIES[family][1]}")
        return {"guidance_scale": guidance, "unet_batch_size": batch}
    if positives:
        usage_error("--positive (perpendicular composition of extra prompts) needs an SD 1.x / 2.x or SDXL model")
    if family == "sd3":
        if mode is GuidanceMode.distilled:
            usage_error("--guidance-mode distilled is for guidance-distilled models (Flux-dev); SD3 is not one")
        return {"guidance_scale": guidance, "transformer_batch_size": batch}
    distilled = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    if mode is GuidanceMode.auto:
        mode = GuidanceMode.cfg if (negatives or uncond or not distilled) else GuidanceMode.distilled
    if mode is GuidanceMode.distilled:
        if not distilled:
            usage_error("--guidance-mode distilled: this Flux model has no distilled guidance embedding "
                        "(guidance_embeds false); use cfg")
        if negatives or uncond:
            usage_error("--negative / --uncond need true-CFG passes: --guidance-mode cfg (or auto)")
        return {"guidance_scale": distilled_guidance, "true_cfg_scale": 1.0, "transformer_batch_size": batch}
    # Flux's true CFG: --guidance is diffusers' true_cfg_scale; a distilled model keeps its embedding as well
    return {"guidance_scale": distilled_guidance, "true_cfg_scale": guidance, "transformer_batch_size": batch}


@generate_app.command("image")
def image_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", help="Main (positive) prompt."),
    negative: list[str] = typer.Option([], "--negative", help="Negative prompt removed with Perp-Neg (repeatable)."),
    negative_weight: list[float] = typer.Option([], "--negative-weight", help="Weight per --negative (>= 0, default 1)."),
    positive: list[str] = typer.Option([], "--positive", help="Extra positive prompt (perpendicular part added; "
                                       "SD / SDXL)."),
    positive_weight: list[float] = typer.Option([], "--positive-weight", help="Weight per --positive (default 1)."),
    uncond: str = typer.Option("", "--uncond", help="Unconditional text (diffusers' negative_prompt)."),
    steps: int = typer.Option(30, "--steps", min=1, help="Sampler (denoising) steps."),
    guidance: float = typer.Option(None, "--guidance", help="Guidance scale s (Flux: the true-CFG scale). Default: "
                                   "the family's (SD / SDXL 7.5, SD3 7.0, Flux 4.0)."),
    guidance_mode: GuidanceMode = typer.Option(GuidanceMode.auto, "--guidance-mode",
                                               help="Guidance-distilled models (Flux-dev): auto (true-CFG passes only "
                                               "with --negative / --uncond), cfg, or distilled (one pass)."),
    distilled_guidance: float = typer.Option(3.5, "--distilled-guidance",
                                             help="Flux-dev's embedded (distilled) guidance value."),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale"),
    num_images: int = typer.Option(1, "--num-images", min=1, help="Images; image i uses seed --seed + i."),
    height: int = typer.Option(None, "--height"),
    width: int = typer.Option(None, "--width"),
    seed: int = opt.seed_option(),
    model_batch_size: int = typer.Option(None, "--model-batch-size", "--unet-batch-size",
                                         help="At most this many samples per UNet / transformer call (memory)."),
    device: str | None = opt.device_option(),
    amp: opt.Amp = typer.Option(opt.Amp.auto, "--amp", help=AMP_HELP),
    out: Path = opt.out_option(None, "Output folder: image_*.png, grid.png, settings.json."),
) -> None:
    """Text-to-image with Perp-Neg negative prompts (SD 1.x/2.x, SDXL, SD3, Flux); PNGs + grid + a JSON of every
    setting (seeded)."""
    import torch

    neg_w = _weights(negative, negative_weight, "negative")
    pos_w = _weights(positive, positive_weight, "positive")
    if any(w < 0 for w in neg_w):
        usage_error("--negative-weight must be >= 0")
    dev = opt.resolve_device(device)
    pipe = load_pipeline(model, dev, allow=tuple(FAMILIES), amp=amp.value)
    family = pipe.negvision_family
    guidance = DEFAULT_GUIDANCE[family] if guidance is None else guidance
    kw = _family_kwargs(pipe, family, guidance=guidance, mode=guidance_mode, distilled_guidance=distilled_guidance,
                        negatives=bool(negative), uncond=uncond, positives=bool(positive), batch=model_batch_size)
    if positive:
        kw.update(positive_prompts=positive, positive_weights=pos_w)
    seeds = [seed + i for i in range(num_images)]  # image i from seed + i: `--seed S+i --num-images 1` redoes it
    gen = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    try:
        images = pipe(
            prompt, uncond_prompt=uncond or None, negative_prompts=negative or None, negative_weights=neg_w or None,
            num_inference_steps=steps, guidance_rescale=guidance_rescale, num_images_per_prompt=num_images,
            height=height, width=width, generator=gen, **kw,
        ).images
    except ValueError as e:  # the pipelines' own checks (sizes, a timestep-distilled model asked for CFG ...)
        usage_error(str(e))
    settings = {"command": "image", "model": model, "family": family, "prompt": prompt, "negative": negative,
                "negative_weight": neg_w, "positive": positive, "positive_weight": pos_w, "uncond": uncond,
                "steps": steps, "guidance": guidance, "guidance_rescale": guidance_rescale,
                "num_images": num_images, "height": height, "width": width, "seed": seed, "seeds": seeds,
                "amp": amp.value, "scheduler": type(pipe.scheduler).__name__}
    if family == "flux":
        settings.update(guidance_mode=guidance_mode.value, true_cfg_scale=kw["true_cfg_scale"],
                        distilled_guidance=kw["guidance_scale"])
    _save(out, images, settings)
    typer.echo(f"wrote {len(images)} image(s) to {out}")


@generate_app.command("views")
def views_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt"),
    views: str = typer.Option("front,side,back", "--views", help="Comma list of front, side, back or azimuths in degrees."),
    schedule: ViewSchedule = typer.Option(ViewSchedule.threestudio, "--schedule", help=SCHEDULE_HELP),
    elevation: float = typer.Option(0.0, "--elevation"),
    steps: int = typer.Option(30, "--steps", min=1, help="Sampler (denoising) steps."),
    guidance: float = typer.Option(7.5, "--guidance"),
    seed: int = opt.seed_option(),
    device: str | None = opt.device_option(),
    amp: opt.Amp = typer.Option(opt.Amp.auto, "--amp", help=AMP_HELP),
    out: Path = opt.out_option(Path("runs/perpneg_views"), "Output folder: view_*.png, grid.png, settings.json."),
) -> None:
    """One image per view from the view-interpolated prompt, with the other views as Perp-Neg negatives."""
    import torch

    from .views import VIEW_AZIMUTH, encode_view_prompts, view_conditioned_embeddings

    names = [v.strip() for v in views.split(",") if v.strip()]
    try:
        azimuths = [VIEW_AZIMUTH[v] if v in VIEW_AZIMUTH else float(v) for v in names]
    except ValueError:
        usage_error(f"bad --views '{views}' (use front, side, back or azimuths in degrees)")
    dev = opt.resolve_device(device)
    pipe = load_pipeline(model, dev, amp=amp.value)
    emb = encode_view_prompts(pipe, prompt)
    images, weights = [], {}
    for name, az in zip(names, azimuths, strict=True):
        pos, negs, w = view_conditioned_embeddings(emb, [elevation], [az], schedule.value)
        gen = torch.Generator("cpu").manual_seed(seed)  # same noise for every view
        images += pipe(
            prompt_embeds=pos, negative_prompt_embeds=emb["uncond"], negative_prompts_embeds=list(negs),
            negative_weights=w, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
        ).images
        weights[name] = [round(float(x), 6) for x in w[:, 0]]
    settings = {"command": "views", "model": model, "prompt": prompt, "views": names, "azimuths": azimuths,
                "elevation": elevation, "schedule": schedule.value, "negative_weights": weights, "steps": steps,
                "guidance": guidance, "seed": seed, "amp": amp.value}
    _save(out, images, settings, names=[f"view_{n}" for n in names])
    typer.echo(f"wrote {len(images)} view(s) to {out}")


@generate_app.command("3d")
def threed_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt"),
    iters: int = typer.Option(1000, "--iters", min=1, help="Optimisation iterations of the voxel grid."),
    out: Path = opt.out_option(Path("runs/perpneg_3d"), "Output folder: turntable.gif, mesh.obj/.ply, grid "
                               "checkpoint, settings.json, log.csv."),
    schedule: ViewSchedule = typer.Option(ViewSchedule.threestudio, "--schedule", help=SCHEDULE_HELP),
    guidance: float = typer.Option(100.0, "--guidance"),
    grid_res: int = typer.Option(64, "--grid-res", help="Voxel grid resolution."),
    render_res: int = typer.Option(64, "--render-res"),
    samples: int = typer.Option(64, "--samples", help="Samples per ray."),
    batch: int = opt.batch_option(1, "Cameras per iteration."),
    lr: float = typer.Option(1e-2, "--lr"),
    preview_every: int = typer.Option(100, "--preview-every"),
    seed: int = opt.seed_option(),
    device: str | None = opt.device_option(),
    amp: opt.Amp = typer.Option(opt.Amp.auto, "--amp", help=AMP_HELP + " The VAE stays fp32."),
) -> None:
    """Text-to-3D: a density/albedo voxel grid trained with Perp-Neg SDS; GIF, mesh (.obj/.ply), checkpoint."""
    from vision.io import write_text_atomic

    from .grid3d import DensityColorGrid, TextTo3DConfig, train_text_to_3d
    from .sds import PerpNegSDS

    dev = opt.resolve_device(device)
    pipe = load_pipeline(model, dev, amp=amp.value)
    pipe.vae.float()  # gradients through the VAE encoder in fp32
    sds = PerpNegSDS.from_pipeline(pipe, prompt, guidance_scale=guidance, schedule=schedule.value)
    grid = DensityColorGrid(resolution=grid_res).to(pipe.device)
    config = TextTo3DConfig(iters=iters, batch_size=batch, render_resolution=render_res, n_samples=samples, lr=lr,
                            seed=seed)
    res = train_text_to_3d(sds, grid, config, out_dir=out, preview_every=preview_every)
    settings = {"command": "3d", "model": model, "prompt": prompt, "iters": iters, "schedule": schedule.value,
                "guidance": guidance, "grid_res": grid_res, "render_res": render_res, "samples": samples,
                "batch": batch, "lr": lr, "seed": seed, "amp": amp.value}
    write_text_atomic(Path(out) / "settings.json", json.dumps(settings, indent=2))
    typer.echo(f"wrote {res['gif']}, {res['mesh_obj']}, {res['mesh_ply']}, {res['checkpoint']}")
