"""``negvision retrieval``: train (dcar | coop), eval (R@K table), make-captions. Heavy imports inside commands."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer

from clip_ood.cli_common import MODEL_HELP, PRETRAINED_HELP, load_encoder_or_fail
from vision import cli_options as opt
from vision.cli_common import fail, interrupted

retrieval_app = typer.Typer(help="DCAR dual prompt learning for image-text retrieval (and the CoOp baseline).",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class Method(str, enum.Enum):
    """The prompt learners of ``clip_ood.dcar.train.METHODS``."""

    dcar = "dcar"
    coop = "coop"


_DATA_HELP = "FDRD JSON ({file_name, file_path, positive, negative}) or CSV/JSONL (image, caption, category, attributes)."


def _pairs(path: Path, image_root: Path | None, skip_bad: bool, categories=None, skipped: list | None = None):
    """The pairs of a caption file, every image decoded once first; bad images stop here naming the file and
    line, or with ``skip_bad`` are left out (their messages appended to ``skipped``)."""
    from clip_ood.dcar.data import PairDataError, load_pairs, verify_pair_images

    try:
        pairs = load_pairs(path, image_root=image_root, categories=categories, skip_bad=skip_bad)
        pairs, bad = verify_pair_images(pairs, path, skip_bad)
    except (PairDataError, FileNotFoundError) as e:
        fail(str(e))
    if bad:
        typer.echo(f"skipped {len(bad)} unreadable image(s) of {path}", err=True)
        if skipped is not None:
            skipped.extend(bad)
    return pairs


@retrieval_app.command()
@opt.resumable
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help=_DATA_HELP),
    method: Method = typer.Option(Method.dcar, "--method", help="dcar (text + visual prompts, weighted negatives, "
                                  "attribute loss) or coop (text context only)."),
    out: Path = opt.out_option(None, "Run folder (config.yaml, logs, checkpoints, prompts.safetensors/.json); a used "
                               "one makes OUT2, OUT3, ... unless --resume or --exist-ok."),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    val_data: Path | None = typer.Option(None, "--val-data", help="Held-out pairs evaluated after each epoch; the "
                                         "prompts of the best epoch (mean recall) are kept."),
    val_split: float = typer.Option(0.15, "--val-split", min=0.0, max=0.9,
                                    help="Without --val-data: share of the training images held out for validation "
                                         "(the same for every seed; 0 = none, the last epoch is kept)."),
    image_root: Path | None = typer.Option(None, "--image-root", help="Folder image paths are relative to."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps "
                                         "(overrides --epochs)."),
    batch: int = opt.batch_option(32, "Image-caption pairs per optimizer step."),
    lr: float = typer.Option(2e-3, "--lr"),
    n_ctx: int = typer.Option(4, "--n-ctx", help="Text context vectors (ignored with --ctx-init)."),
    ctx_init: str = typer.Option("", "--ctx-init", help='Initialise the context from words, e.g. "a photo of a".'),
    class_specific: bool = typer.Option(False, "--class-specific", help="One context per category (CoOp CSC)."),
    n_vis: int = typer.Option(4, "--n-vis", help="Visual prompt tokens (dcar)."),
    vis_depth: int = typer.Option(0, "--vis-depth", help="Layers with visual prompts (1 = shallow; 0 = all, max 9)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Category-matching weight of negatives: w = 1 + alpha * m."),
    k_neg: int = typer.Option(3, "--k-neg", help="Extra negative captions per image (FDRD / class-name swap)."),
    lambda_attr: float = typer.Option(0.0, "--lambda-attr", help="Weight of the MI-weighted attribute loss (0 = off, "
                                      "the default: it did not help on the benchmark's validation split; 0.5 = on)."),
    hard_share: float = typer.Option(1.0, "--hard-share", min=0.0, max=1.0,
                                     help="dcar: share of each batch in groups of pairs with the same attributes "
                                          "and different categories (hard in-batch negatives; 0 = random batches)."),
    hard_group: int = typer.Option(4, "--hard-group", min=2, help="Pairs per hard group."),
    attr_text_grad: bool = typer.Option(False, "--attr-text-grad",
                                        help="Let the attribute loss train the text context too (default: visual "
                                             "prompts only)."),
    workers: int = opt.workers_option(0),
    seed: int = opt.seed_option(),
    device: str | None = opt.device_option(),
    amp: opt.Amp = opt.amp_option(),
    resume: str | None = opt.resume_option(),
    exist_ok: bool = opt.exist_ok_option(),
    checkpoint_every: int = opt.checkpoint_every_option(),
    deterministic: bool = opt.deterministic_option(),
    skip_bad: bool = opt.skip_bad_option("Skip malformed lines and unreadable images (with a warning; train lists them in OUT/skipped.txt)."),
    config: Path | None = opt.config_option(),
) -> None:
    """Learn prompts (DCAR: text + visual + reweighting; CoOp: text context) on a frozen CLIP."""
    dev = opt.resolve_device(device)
    opt.parse_resume(resume)  # a bad --resume stops before the encoder loads
    from clip_ood.dcar.data import categories_of
    from clip_ood.dcar.train import DCARConfig, train_retrieval
    from vision.engine import (
        CheckpointCorruptError,
        TrainConfig,
        TrainingInterrupted,
        WeightsMismatchError,
    )

    bad_tr: list[str] = []
    bad_va: list[str] = []
    tr = _pairs(data, image_root, skip_bad, skipped=bad_tr)
    va = (_pairs(val_data, image_root, skip_bad, categories_of(tr) if class_specific else None, skipped=bad_va)
          if val_data else None)
    enc = load_encoder_or_fail(model, pretrained, dev)
    cfg = DCARConfig(method=method.value, n_ctx=n_ctx, ctx_init=ctx_init or None, class_specific=class_specific,
                     n_vis=n_vis, vis_depth=vis_depth or None, alpha=alpha, k_neg=k_neg, lambda_attr=lambda_attr,
                     attr_text_grad=attr_text_grad, hard_share=hard_share, hard_group=hard_group, val_split=val_split)
    train_cfg = TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch, seed=seed,
                            mixed_precision=amp.value, checkpoint_every=checkpoint_every, deterministic=deterministic)
    # no --device: the CPU when the encoder landed there, else Accelerate's choice (the launcher's under DDP)
    run_dev = dev if dev is not None else ("cpu" if enc.device.type == "cpu" else None)
    run = opt.run_options(ctx, device=run_dev)
    try:
        _, summary = train_retrieval(enc.model, enc.tokenizer, enc.preprocess, tr, va, cfg, train_cfg, run,
                                     skipped={"train": bad_tr, "val": bad_va},
                                     extra_config={"model": model, "pretrained": pretrained or None})
    except TrainingInterrupted as e:
        interrupted(f"{e} (negvision retrieval train ... --resume)")
    except (FileNotFoundError, CheckpointCorruptError, WeightsMismatchError) as e:
        fail(str(e))
    typer.echo(json.dumps({k: summary.get(k) for k in ("steps", "last_loss", "best_metric", "last_metrics",
                                                       "selected")}))
    if str(summary.get("selected", "")).startswith("frozen"):
        typer.echo("the frozen model (zero-shot) scored best on the validation pairs: the saved prompts are switched "
                   "off and give its features", err=True)
    typer.echo(f"prompts written to {Path(summary['out']) / 'prompts.safetensors'}")


@retrieval_app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help=_DATA_HELP),
    prompts: Path | None = typer.Option(None, "--prompts", help="Folder (or prompts.safetensors) from `train`; "
                                        "without it the frozen (zero-shot) model is evaluated."),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    image_root: Path | None = typer.Option(None, "--image-root"),
    batch: int = opt.batch_option(64, "Images / captions per forward pass."),
    device: str | None = opt.device_option(),
    skip_bad: bool = opt.skip_bad_option("Skip malformed lines and unreadable images (with a warning; train lists them in OUT/skipped.txt)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
    examples: int = typer.Option(6, "--examples", min=0,
                                 help="Queries shown in top5_examples.jpg, written next to --json (else into the "
                                      "--prompts folder); 0 = no picture."),
) -> None:
    """Image->text and text->image R@1/5/10 and mean recall, as a table (and a picture of top-5 examples)."""
    dev = opt.resolve_device(device)
    from clip_ood.dcar.data import PairDataset
    from clip_ood.dcar.evaluate import format_table, recall_at_k, retrieval_similarity
    from clip_ood.dcar.prompts import DualPromptCLIP
    from clip_ood.dcar.train import PROMPTS_CONFIG, load_prompts, read_prompt_config
    from vision.io import write_text_atomic

    enc = load_encoder_or_fail(model, pretrained, dev)
    if prompts is not None:
        try:
            learner = load_prompts(prompts, enc.model, enc.tokenizer)
        except (FileNotFoundError, ValueError, KeyError) as e:
            fail(str(e))
        name = read_prompt_config((prompts if prompts.is_dir() else prompts.parent) / PROMPTS_CONFIG).get(
            "method", "prompts")
    else:
        learner = DualPromptCLIP(enc.model, enc.tokenizer, n_ctx=0)
        name = "zero-shot"
    cats = learner.categories if learner.class_specific else None
    pairs = _pairs(data, image_root, skip_bad, cats)
    learner.to(enc.device)
    sim, texts, gt = retrieval_similarity(learner, PairDataset(pairs, enc.preprocess), batch_size=batch)
    res = recall_at_k(sim, gt)
    typer.echo(format_table({name: res}))
    if json_out is not None:
        write_text_atomic(json_out, json.dumps({name: res}, indent=2))
    pic_dir = json_out.parent if json_out is not None else (
        (prompts if prompts.is_dir() else prompts.parent) if prompts is not None else None)
    if examples > 0 and pic_dir is None:
        typer.echo("top5_examples.jpg not written: give --json (the picture goes next to it)", err=True)
    elif examples > 0:
        from clip_ood.plots import save_retrieval_examples

        pic = save_retrieval_examples(pic_dir / "top5_examples.jpg", sim, gt, texts, [p.image for p in pairs],
                                      [p.caption for p in pairs], n=examples, k=5, title=name)
        typer.echo(f"examples written to {pic}", err=True)


@retrieval_app.command("make-captions")
def make_captions(
    out: Path = opt.out_option(None, "Folder for images/, train.csv, test.csv."),
    n_train: int = typer.Option(400, "--n-train"),
    n_test: int = typer.Option(200, "--n-test"),
    size: int = typer.Option(32, "--size", help="Image side in pixels."),
    seed: int = opt.seed_option(),
) -> None:
    """Generate the digits-on-textures caption set (digit, colour, background)."""
    from clip_ood.dcar.synthetic import make_caption_set

    paths = make_caption_set(out, n_train, n_test, seed, size)
    typer.echo(f"wrote {paths['train']} ({n_train} pairs) and {paths['test']} ({n_test} pairs)")
