"""``negvision ood``: mine-labels, score, bench, serve. Heavy imports (torch, open_clip) happen inside commands."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer
from typer.core import TyperCommand

from clip_ood.cli_common import MODEL_HELP, PRETRAINED_HELP, dist_env, load_encoder_or_fail
from vision import cli_options as opt
from vision.cli_common import fail, usage_error

ood_app = typer.Typer(help="Zero-shot OOD scoring with CLIP and negative labels (NegLabel, ANTS).",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class AntsMode(str, enum.Enum):
    """Which negatives ANTS uses (``clip_ood.ants.MODES``)."""

    ada = "ada"
    far_only = "far_only"
    near_only = "near_only"


ANTS_MODE_HELP = "ANTS negatives: ada (far + near, adaptive weight), far_only or near_only."
CONF_HELP = "Score threshold: is_ood = score < conf."


def _continue_csv(resume: str | None, no_resume: bool) -> bool:
    """``ood score``'s ``--resume`` (the default: skip the images already in --out) / ``--no-resume``."""
    if no_resume:
        return False
    if resume is None or resume.lower() in (opt.RESUME_LAST, "true", "yes", "1"):
        return True
    if resume.lower() in ("false", "no", "0"):
        return False
    usage_error(f"--resume takes no value here (it continues --out's CSV), got '{resume}'")


# ---------------------------------------------------------------------- --method: the scores registry
def method_names() -> list[str]:
    """The ``--method`` choices: every score registered in ``clip_ood.scores.SCORES`` (imports torch)."""
    from clip_ood.scores import SCORES

    return SCORES.names()


def method_help() -> str:
    """``--method`` help text listing the registered scores."""
    return "OOD score: " + " | ".join(method_names()) + "."


def _check_method(value: str) -> str:
    """Option callback: a registered score, else exit 2 listing them."""
    from clip_ood.scores import SCORES
    from vision.registry import RegistryError

    try:
        SCORES.get(value)
    except RegistryError as e:
        usage_error(f"--method: {e}")
    return value


class _MethodCommand(TyperCommand):
    """A command whose ``--method`` help is read from the scores registry when that help is shown (building the
    group, e.g. for ``negvision ood --help``, must not import torch, which the registry's module needs)."""

    def format_help(self, ctx, formatter) -> None:
        for p in self.params:
            if p.name == "method":
                p.help = method_help()
        super().format_help(ctx, formatter)


def _method_option(default: str = "neglabel"):
    return typer.Option(default, "--method", callback=_check_method,
                        help="OOD score registered in clip_ood.scores.SCORES (listed by this command's --help).")


# ---------------------------------------------------------------------- shared steps of the commands
def _id_labels(path: Path | None, id_dir: Path | None = None) -> list[str]:
    from clip_ood.data import class_folders
    from clip_ood.lexicon import read_labels

    if path is not None:
        try:
            return read_labels(path)
        except (OSError, ValueError) as e:
            fail(str(e))
    if id_dir is not None and id_dir.is_dir() and class_folders(id_dir):
        return [c.replace("_", " ") for c in class_folders(id_dir)]
    fail("give --id-labels (class names, one a line)")


def _negatives(encoder, labels: list[str], method: str, neg_labels: Path | None, num_negatives: int,
               percentile: float, save_to: Path | None):
    from clip_ood.lexicon import NegativeLabels, mine_negative_labels
    from clip_ood.scores import score_spec

    if not score_spec(method).needs_negatives:
        return NegativeLabels.load(neg_labels) if neg_labels else None
    if neg_labels is not None:
        if not neg_labels.is_file():
            fail(f"--neg-labels {neg_labels}: no such file (make it with `negvision ood mine-labels`)")
        return NegativeLabels.load(neg_labels)
    typer.echo(f"mining {num_negatives} negative labels from WordNet (cached after the first run)", err=True)
    neg = mine_negative_labels(encoder, labels, num_negatives, percentile)
    if save_to is not None:
        neg.save(save_to)
        typer.echo(f"negative labels written to {save_to}", err=True)
    return neg


def _scorer(encoder, labels, method, negatives, describer: str, describer_model: str | None, mode: str,
            ants_state: Path | None, seed: int = 0):
    from clip_ood.scorer import OODScorer

    try:
        sc = OODScorer(encoder, labels, method=method, negatives=negatives, seed=seed)
    except ValueError as e:
        fail(str(e))
    if method == "ants":
        from clip_ood.describers import create_describer

        kw = {"encoder": encoder} if describer == "lexicon" else {}
        if describer_model and describer != "lexicon":
            kw["model"] = describer_model
        sc.ants.describer = create_describer(describer, **kw)
        sc.ants.mode = mode
        if ants_state is not None and ants_state.with_suffix(".json").is_file():
            sc.ants.load(ants_state)
            typer.echo(f"ANTS state loaded from {ants_state.with_suffix('.json')}", err=True)
    return sc


# ---------------------------------------------------------------------- commands
@ood_app.command("mine-labels")
def mine_labels(
    id_labels: Path = typer.Option(..., "--id-labels", help="ID class names, one a line."),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    out: Path = typer.Option(Path("neg.txt"), "--out", help="Output: one 'noun|adj<TAB>word' a line."),
    num_negatives: int = typer.Option(10_000, "--num-negatives", min=1),
    percentile: float = typer.Option(0.95, "--percentile", min=0.0, max=1.0),
    words: Path | None = typer.Option(None, "--words", help="Own candidate list instead of WordNet ('adj<TAB>word' or 'word')."),
    exclude: str = typer.Option("noun.person,noun.quantity,noun.group,adj.pert", "--exclude",
                                help="WordNet lexicographer files to leave out (comma list, '' for none)."),
    device: str | None = opt.device_option(),
) -> None:
    """Mine NegLabel negative labels far from the ID classes (WordNet nouns + adjectives)."""
    from clip_ood.lexicon import load_wordnet, mine_negative_labels, read_words

    dev = opt.resolve_device(device)
    labels = _id_labels(id_labels)
    enc = load_encoder_or_fail(model, pretrained, dev)
    lex = read_words(words) if words else load_wordnet(exclude=[e for e in exclude.split(",") if e])
    neg = mine_negative_labels(enc, labels, num_negatives, percentile, lexicon=lex)
    neg.save(out)
    typer.echo(json.dumps({"out": str(out), "negatives": len(neg), "nouns": neg.pos.count("noun"),
                           "adjectives": neg.pos.count("adj"), "candidates": len(lex)}))


@ood_app.command("score", cls=_MethodCommand)
def score(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_labels: Path = typer.Option(..., "--id-labels", help="ID class names, one a line."),
    method: str = _method_option(),
    source: Path = typer.Option(..., "--source", help="Image folder (recursive) or an image list file."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Root of the paths in a list file."),
    out: Path = typer.Option(Path("scores.csv"), "--out", help="CSV: path,score,is_ood,top_class,top_prob."),
    neg_labels: Path | None = typer.Option(None, "--neg-labels", help="Mined negatives (else mined now, saved next to --out)."),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    conf: float = typer.Option(0.5, "--conf", "--threshold", help=CONF_HELP),
    batch: int = opt.batch_option(64, "Images per forward pass."),
    resume: str | None = typer.Option(None, "--resume", metavar="",
                                      help="Continue --out: skip the images already in it (the default)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start --out afresh."),
    skip_bad: bool = opt.skip_bad_option("Skip unreadable images with a warning."),
    describer: str = typer.Option("lexicon", "--describer", help="ANTS: lexicon (offline) | qwen2-vl | llava | blip"),
    describer_model: str | None = typer.Option(None, "--describer-model", help="Hub name or local folder."),
    ants_mode: AntsMode = typer.Option(AntsMode.ada, "--ants-mode", help=ANTS_MODE_HELP),
    ants_state: Path | None = typer.Option(None, "--ants-state", help="Load/save the ANTS state here."),
    device: str | None = opt.device_option(),
) -> None:
    """Score images (streamed, resumable); under `accelerate launch` each process takes a shard."""
    dev = opt.resolve_device(device)
    resume_csv = _continue_csv(resume, no_resume)
    import csv

    from tqdm import tqdm

    from clip_ood.data import BadImageError, iter_batches, list_images

    rank, world, _ = dist_env()
    try:
        paths = list_images(source, data_root)
    except (OSError, ValueError) as e:
        fail(str(e))
    paths = paths[rank::world]
    if world > 1:
        out = out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    done: set[str] = set()
    if resume_csv and out.is_file():
        with open(out, newline="", encoding="utf-8") as f:
            done = {row["path"] for row in csv.DictReader(f)}
    todo = [p for p in paths if str(p) not in done]
    labels = _id_labels(id_labels)
    enc = load_encoder_or_fail(model, pretrained, dev)
    neg = _negatives(enc, labels, method, neg_labels, num_negatives, 0.95, out.with_suffix(".neg.txt"))
    sc = _scorer(enc, labels, method, neg, describer, describer_model, ants_mode.value, ants_state)
    new_file = not out.is_file() or not resume_csv
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w" if new_file else "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new_file:
            w.writerow(["path", "score", "is_ood", "top_class", "top_prob"])
        try:
            for bp, ims in tqdm(iter_batches(todo, batch, skip_bad), total=-(-len(todo) // batch),
                                desc="scoring", unit="batch", disable=None):
                r = sc.score_images(ims)
                p, c = r.id_probs.max(dim=-1)
                for i, path in enumerate(bp):
                    s = float(r.scores[i])
                    w.writerow([str(path), f"{s:.6f}", int(s < conf), labels[int(c[i])], f"{float(p[i]):.6f}"])
                f.flush()  # results are on disk as they come (resumable)
                n += len(bp)
        except BadImageError as e:
            fail(f"{e} (use --skip-bad to skip it)")
    if ants_state is not None and sc.ants is not None:
        sc.ants.save(ants_state)
    typer.echo(json.dumps({"out": str(out), "scored": n, "skipped_done": len(paths) - len(todo),
                           "rank": rank, "world_size": world, "method": method}))


@ood_app.command("bench", cls=_MethodCommand)
def bench(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_dir: Path = typer.Option(..., "--id-dir", help="ID images: class folders, any folder, or a list file."),
    ood_dir: list[Path] = typer.Option(..., "--ood-dir", help="OOD set (folder or list file); repeat for several."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Root of the paths in list files."),
    id_labels: Path | None = typer.Option(None, "--id-labels", help="ID class names (default: --id-dir's sub-folders)."),
    method: str = _method_option(),
    neg_labels: Path | None = typer.Option(None, "--neg-labels"),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    out: Path = opt.out_option(Path("runs/ood_bench"), "Output folder: metrics.json/csv, scores.csv, plots."),
    batch: int = opt.batch_option(64, "Images per forward pass."),
    max_images: int | None = typer.Option(None, "--max-images", help="At most this many images per set."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed of the ANTS mixed stream."),
    skip_bad: bool = opt.skip_bad_option("Skip unreadable images with a warning."),
    describer: str = typer.Option("lexicon", "--describer"),
    describer_model: str | None = typer.Option(None, "--describer-model"),
    ants_mode: AntsMode = typer.Option(AntsMode.ada, "--ants-mode", help=ANTS_MODE_HELP),
    device: str | None = opt.device_option(),
) -> None:
    """FPR95 / AUROC / AUPR per OOD set and averaged, with score histograms and ROC plots."""
    dev = opt.resolve_device(device)
    import csv
    import io
    import random

    import numpy as np
    from tqdm import tqdm

    from clip_ood.data import BadImageError, iter_batches, list_images
    from clip_ood.metrics import ood_metrics, roc_points
    from clip_ood.plots import plot_roc_logfpr
    from clip_ood.scores import score_spec
    from vision.io import write_text_atomic
    from vision.viz import plot_roc_curve, plot_score_histograms

    sets: dict[str, list[Path]] = {}
    try:
        sets["ID"] = list_images(id_dir, data_root)[:max_images]
        for d in ood_dir:
            name = d.stem if d.is_file() else d.name
            while name in sets:
                name += "_"
            sets[name] = list_images(d, data_root)[:max_images]
    except (OSError, ValueError) as e:
        fail(str(e))
    for k, v in sets.items():
        if not v:
            fail(f"set '{k}' has no images")
    labels = _id_labels(id_labels, id_dir)
    enc = load_encoder_or_fail(model, pretrained, dev)
    out.mkdir(parents=True, exist_ok=True)
    neg = _negatives(enc, labels, method, neg_labels, num_negatives, 0.95, out / "neg.txt")
    sc = _scorer(enc, labels, method, neg, describer, describer_model, ants_mode.value, None, seed)
    stream = [(p, k) for k, v in sets.items() for p in v]
    if score_spec(method).state is not None:  # test-time adaptation sees one mixed, shuffled ID+OOD stream
        random.Random(seed).shuffle(stream)
    set_of = {str(p): k for p, k in stream}
    got: dict[str, list[float]] = {k: [] for k in sets}
    rows = []
    try:
        for bp, ims in tqdm(iter_batches([p for p, _ in stream], batch, skip_bad),
                            total=-(-len(stream) // batch), desc="bench", unit="batch", disable=None):
            r = sc.score_images(ims)
            for path, s in zip(bp, r.scores.tolist(), strict=False):
                k = set_of[str(path)]
                got[k].append(s)
                rows.append((str(path), k, s))
    except BadImageError as e:
        fail(f"{e} (use --skip-bad to skip it)")
    results: dict[str, dict] = {}
    for k in sets:
        if k == "ID":
            continue
        m = ood_metrics(got["ID"], got[k])
        m["n_id"], m["n_ood"] = len(got["ID"]), len(got[k])
        results[k] = m
        fpr, tpr = roc_points(got["ID"], got[k])
        plot_roc_curve(fpr, tpr, out / f"roc_{k}.png", auroc=m["auroc"])
        plot_score_histograms(np.array(got["ID"]), np.array(got[k]), out / f"hist_{k}.png", labels=("ID", k))
    plot_roc_logfpr({k: (got["ID"], got[k]) for k in results}, out / "roc_logfpr.png",
                    title=f"{method}: OOD ROC, ID = positive (n_id={len(got['ID'])})")
    avg = {key: float(np.mean([r[key] for r in results.values()])) for key in ("auroc", "fpr95", "aupr_in", "aupr_out")}
    summary = {"method": method, "model": model, "per_set": results, "average": avg}
    if method == "ants":
        summary["ants"] = {"lambda": sc.ants.lambda_, "tau": sc.ants.tau, "far_bank": len(sc.ants.far_texts),
                           "near_labels": len(sc.ants.near_texts)}
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["set", "auroc", "fpr95", "aupr_in", "aupr_out"])
    for k, m in list(results.items()) + [("average", avg)]:
        w.writerow([k] + [f"{m[c]:.6f}" for c in ("auroc", "fpr95", "aupr_in", "aupr_out")])
    write_text_atomic(out / "metrics.csv", buf.getvalue())
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["path", "set", "score"])
    w.writerows((p, k, f"{s:.6f}") for p, k, s in rows)
    write_text_atomic(out / "scores.csv", buf.getvalue())
    for k, m in list(results.items()) + [("average", avg)]:
        typer.echo(f"{k:>16}  AUROC {100 * m['auroc']:6.2f}  FPR95 {100 * m['fpr95']:6.2f}", err=True)
    typer.echo(json.dumps({"out_dir": str(out), "average": avg}))


@ood_app.command("serve", cls=_MethodCommand)
def serve(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_labels: Path = typer.Option(..., "--id-labels"),
    method: str = _method_option(),
    neg_labels: Path | None = typer.Option(None, "--neg-labels"),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="NEGVISION_API_KEY",
                                       help="Require this key (X-API-Key or Authorization: Bearer)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    conf: float = typer.Option(0.5, "--conf", "--threshold", help=CONF_HELP),
    max_images: int = typer.Option(32, "--max-images", help="Images per request."),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", help="Bytes per request (MiB)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Pixels per image (decompression bombs)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Images per micro-batched encoder call."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="How long to gather concurrent requests."),
    describer: str = typer.Option("lexicon", "--describer"),
    describer_model: str | None = typer.Option(None, "--describer-model"),
    ants_mode: AntsMode = typer.Option(AntsMode.ada, "--ants-mode", help=ANTS_MODE_HELP),
    device: str | None = opt.device_option(),
) -> None:
    """Serve the scoring API (FastAPI; OpenAPI docs at /docs)."""
    dev = opt.resolve_device(device)
    import uvicorn

    from clip_ood.api import ApiLimits, create_app

    labels = _id_labels(id_labels)
    enc = load_encoder_or_fail(model, pretrained, dev)
    neg = _negatives(enc, labels, method, neg_labels, num_negatives, 0.95, None)
    sc = _scorer(enc, labels, method, neg, describer, describer_model, ants_mode.value, None)
    limits = ApiLimits(max_images=max_images, max_request_bytes=int(max_request_mb * 1024 * 1024),
                       max_pixels=max_pixels)
    app = create_app(sc, api_key=api_key, threshold=conf, limits=limits, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")
