"""``negvision ood``: mine-labels, score, bench, serve. Heavy imports (torch, open_clip) happen inside commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from clip_ood.cli_common import MODEL_HELP, PRETRAINED_HELP, dist_env, load_encoder_or_fail
from vision import cli_options as opt
from vision.cli_common import fail, usage_error

ood_app = typer.Typer(help="Zero-shot OOD scoring with CLIP and negative labels (NegLabel, ANTS).",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


# choices read from the registries when they are needed (their modules import torch): no edit here for a new one
METHOD = opt.RegistryChoice("--method", "clip_ood.scores:SCORES", "OOD score")
DESCRIBER = opt.RegistryChoice("--describer", "clip_ood.describers:DESCRIBERS", "ANTS image describer")
ANTS_MODE = opt.RegistryChoice("--ants-mode", "clip_ood.ants:MODES", "ANTS negatives mode (ada: far + near with an "
                               "adaptive weight)")
CONF_HELP = "A fixed score threshold: is_ood = score < conf (prefer --calibration)."


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
_MethodCommand = opt.registry_command(method=METHOD, describer=DESCRIBER, ants_mode=ANTS_MODE)


def method_names() -> list[str]:
    """The ``--method`` choices: every score registered in ``clip_ood.scores.SCORES`` (imports torch)."""
    return METHOD.names()


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


@dataclass
class Prompts:
    """``--id-template`` / ``--neg-template`` / ``--temperature`` of a command (empty: the method's defaults)."""

    id_templates: list[str]
    neg_templates: list[str]
    temperature: float | None

    def id_for(self, method: str) -> tuple[str, ...]:
        from clip_ood.scores import score_spec

        return tuple(self.id_templates) or score_spec(method).default_id_templates


def _id_template_option():
    return typer.Option([], "--id-template", help="ID prompt with one {} (repeat: features averaged). Default: the "
                        "method's, 'The nice {}.' for neglabel / ants, 'a photo of a {}.' for mcm / energy / max_logit.")


def _neg_template_option():
    return typer.Option([], "--neg-template", help="Negative-label prompt with one {} (repeat: averaged). Default: "
                        "'The nice {}.' for nouns, 'This is a {} photo.' for adjectives.")


def _temperature_option():
    return typer.Option(None, "--temperature", min=1e-6, help="Softmax temperature (default: the method's, 1.0 for "
                        "mcm, 0.01 for the others).")


def _prompts(id_template: list[str], neg_template: list[str], temperature: float | None) -> Prompts:
    """Checked before any model loads: a bad template exits 2."""
    from clip_ood.lexicon import check_template

    for t in [*id_template, *neg_template]:
        try:
            check_template(t)
        except ValueError as e:
            usage_error(str(e))
    return Prompts(list(id_template), list(neg_template), temperature)


def _negatives(encoder, labels: list[str], method: str, neg_labels: Path | None, num_negatives: int,
               percentile: float, save_to: Path | None, prompts: Prompts | None = None):
    from clip_ood.lexicon import NegativeLabels, mine_negative_labels
    from clip_ood.scores import score_spec

    def load(path: Path):
        if not path.is_file():
            fail(f"--neg-labels {path}: no such file (make it with `negvision ood mine-labels`)")
        try:
            return NegativeLabels.load(path)
        except (OSError, ValueError) as e:
            fail(str(e))

    if not score_spec(method).needs_negatives:
        return load(neg_labels) if neg_labels else None
    if neg_labels is not None:
        return load(neg_labels)
    typer.echo(f"mining {num_negatives} negative labels from WordNet (cached after the first run)", err=True)
    kw = {}
    if prompts is not None:
        kw = {"id_templates": prompts.id_for(method), "neg_templates": prompts.neg_templates or None}
    neg = mine_negative_labels(encoder, labels, num_negatives, percentile, **kw)
    if save_to is not None:
        neg.save(save_to)
        typer.echo(f"negative labels written to {save_to}", err=True)
    return neg


def _scorer(encoder, labels, method, negatives, describer: str, describer_model: str | None, mode: str,
            ants_state: Path | None, seed: int = 0, prompts: Prompts | None = None):
    from clip_ood.serve import make_scorer

    had_state = ants_state is not None and ants_state.with_suffix(".json").is_file()
    p = prompts or Prompts([], [], None)
    try:
        sc = make_scorer(encoder, labels, method, negatives, describer, describer_model, mode, ants_state, seed,
                         id_templates=p.id_templates or None, neg_templates=p.neg_templates or None,
                         temperature=p.temperature)
    except (ValueError, KeyError) as e:
        fail(str(e).strip("'\""))
    if had_state and sc.state is not None:
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
    try:
        lex = read_words(words) if words else load_wordnet(exclude=[e for e in exclude.split(",") if e])
    except (OSError, ValueError) as e:
        fail(str(e))
    neg = mine_negative_labels(enc, labels, num_negatives, percentile, lexicon=lex)
    neg.save(out)
    typer.echo(json.dumps({"out": str(out), "negatives": len(neg), "nouns": neg.pos.count("noun"),
                           "adjectives": neg.pos.count("adj"), "candidates": len(lex)}))


@ood_app.command("score", cls=_MethodCommand)
def score(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_labels: Path = typer.Option(..., "--id-labels", help="ID class names, one a line."),
    method: str = METHOD.option("neglabel"),
    source: Path = typer.Option(..., "--source", help="Image folder (recursive) or an image list file."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Root of the paths in a list file."),
    out: Path = typer.Option(Path("scores.csv"), "--out", help="CSV: path,score,is_ood,top_class,top_prob."),
    neg_labels: Path | None = typer.Option(None, "--neg-labels", help="Mined negatives (else mined now, saved next to --out)."),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    conf: float | None = typer.Option(None, "--conf", "--threshold", help=CONF_HELP),
    calibration: Path | None = typer.Option(None, "--calibration", help="calibration.json of `ood bench`: "
                                            "is_ood uses its threshold (neither this nor --conf: is_ood is empty)."),
    batch: int = opt.batch_option(64, "Images per forward pass."),
    resume: str | None = typer.Option(None, "--resume", metavar="",
                                      help="Continue --out: skip the images already in it (the default)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start --out afresh."),
    skip_bad: bool = opt.skip_bad_option("Skip unreadable images with a warning."),
    describer: str = DESCRIBER.option("lexicon"),
    describer_model: str | None = typer.Option(None, "--describer-model", help="Hub name or local folder."),
    ants_mode: str = ANTS_MODE.option("ada"),
    ants_state: Path | None = typer.Option(None, "--ants-state", help="Load/save the ANTS state here."),
    id_template: list[str] = _id_template_option(),
    neg_template: list[str] = _neg_template_option(),
    temperature: float | None = _temperature_option(),
    device: str | None = opt.device_option(),
) -> None:
    """Score images (streamed, resumable); under `accelerate launch` each process takes a shard."""
    dev = opt.resolve_device(device)
    prompts = _prompts(id_template, neg_template, temperature)
    resume_csv = _continue_csv(resume, no_resume)
    if conf is not None and calibration is not None:
        usage_error("give --calibration or --conf, not both")
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
    neg = _negatives(enc, labels, method, neg_labels, num_negatives, 0.95, out.with_suffix(".neg.txt"), prompts)
    sc = _scorer(enc, labels, method, neg, describer, describer_model, ants_mode, ants_state, prompts=prompts)
    if calibration is not None:
        conf = _calibrated_threshold(calibration, sc)
    elif conf is None:
        typer.echo("no threshold given: the is_ood column stays empty (give --calibration from `ood bench`, "
                   "or --conf)", err=True)
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
                    w.writerow([str(path), f"{s:.6f}", "" if conf is None else int(s < conf), labels[int(c[i])],
                                f"{float(p[i]):.6f}"])
                f.flush()  # results are on disk as they come (resumable)
                n += len(bp)
        except BadImageError as e:
            fail(f"{e} (use --skip-bad to skip it)")
    if ants_state is not None and sc.state is not None:
        sc.state.save(ants_state)
    from vision.io import write_text_atomic

    meta = {"model": model, "pretrained": pretrained or None, "source": str(source), **sc.settings(),
            "threshold": "uncalibrated" if conf is None else conf,
            "calibration": str(calibration) if calibration else None}
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(meta, indent=2) + "\n")
    typer.echo(json.dumps({"out": str(out), "scored": n, "skipped_done": len(paths) - len(todo),
                           "rank": rank, "world_size": world, **meta}))


def _calibrated_threshold(path: Path, scorer) -> float:
    """The threshold of a calibration file made for ``scorer``, else exit 1 naming what differs."""
    from clip_ood.calibration import CalibrationError, check_calibration, read_calibration

    try:
        return float(check_calibration(read_calibration(path), scorer, path)["threshold"])
    except CalibrationError as e:
        fail(str(e))


def _method_list(value: str) -> list[str]:
    """``--method a,b,c`` as a list without repeats (order kept)."""
    return list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))


def _check_methods(value: str) -> str:
    """Option callback: one registered score or a comma list of them, else exit 2 listing them."""
    names = _method_list(value)
    if not names:
        usage_error("--method: give one method or a comma list (mcm,neglabel,ants)")
    for m in names:
        METHOD.check(m)
    return value


def _csv_text(rows) -> str:
    """Rows (the header first) as CSV text, for an atomic write."""
    import csv
    import io

    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


@ood_app.command("bench", cls=_MethodCommand)
def bench(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_dir: Path = typer.Option(..., "--id-dir", help="ID images: class folders, any folder, or a list file."),
    ood_dir: list[Path] = typer.Option(..., "--ood-dir", help="OOD set (folder or list file); repeat for several."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Root of the paths in list files."),
    id_labels: Path | None = typer.Option(None, "--id-labels", help="ID class names (default: --id-dir's sub-folders)."),
    method: str = typer.Option("neglabel", "--method", callback=_check_methods,
                               help="OOD score, or a comma list (mcm,neglabel,ants): one pass over the images, "
                                    "each image encoded once for all of them."),
    neg_labels: Path | None = typer.Option(None, "--neg-labels"),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    out: Path = opt.out_option(Path("runs/ood_bench"), "Output folder: metrics.json/csv, scores.csv, calibration.json, "
                               "plots (one sub-folder per method when several); a used one makes OUT2, OUT3, ... "
                               "unless --exist-ok."),
    exist_ok: bool = opt.exist_ok_option(),
    batch: int = opt.batch_option(64, "Images per forward pass."),
    max_images: int | None = typer.Option(None, "--max-images", help="At most this many images per set."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed of the ANTS mixed stream."),
    skip_bad: bool = opt.skip_bad_option("Skip unreadable images with a warning."),
    describer: str = DESCRIBER.option("lexicon"),
    describer_model: str | None = typer.Option(None, "--describer-model"),
    ants_mode: str = ANTS_MODE.option("ada"),
    id_template: list[str] = _id_template_option(),
    neg_template: list[str] = _neg_template_option(),
    temperature: float | None = _temperature_option(),
    device: str | None = opt.device_option(),
) -> None:
    """FPR95 / AUROC / AUPR per OOD set and averaged, with score histograms and ROC plots; calibration.json."""
    dev = opt.resolve_device(device)
    prompts = _prompts(id_template, neg_template, temperature)
    import random

    from tqdm import tqdm

    from clip_ood.data import BadImageError, iter_batches, list_images
    from clip_ood.encoders import encode_pil
    from clip_ood.scores import score_spec

    methods = _method_list(method)
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
    from vision.engine.run import prepare_run_dir

    out = prepare_run_dir(out, exist_ok=exist_ok)  # the one run-folder rule: a used folder is never mixed into
    mining = next((m for m in methods if score_spec(m).needs_negatives), methods[0])
    neg = _negatives(enc, labels, mining, neg_labels, num_negatives, 0.95, out / "neg.txt", prompts)
    scorers = {m: _scorer(enc, labels, m, neg, describer, describer_model, ants_mode, None, seed, prompts)
               for m in methods}
    stream = [(p, k) for k, v in sets.items() for p in v]
    if any(score_spec(m).state is not None for m in methods):  # test-time adaptation sees one mixed, shuffled stream
        random.Random(seed).shuffle(stream)
    set_of = {str(p): k for p, k in stream}
    got: dict[str, dict[str, list[float]]] = {m: {k: [] for k in sets} for m in methods}
    rows: dict[str, list] = {m: [] for m in methods}
    try:
        for bp, ims in tqdm(iter_batches([p for p, _ in stream], batch, skip_bad),
                            total=-(-len(stream) // batch), desc="bench", unit="batch", disable=None):
            feats = encode_pil(enc, ims)  # once for every method
            for m, sc in scorers.items():
                r = sc.score_features(feats, images=ims)
                for path, sv in zip(bp, r.scores.tolist(), strict=False):
                    k = set_of[str(path)]
                    got[m][k].append(sv)
                    rows[m].append((str(path), k, sv))
    except BadImageError as e:
        fail(f"{e} (use --skip-bad to skip it)")
    averages = {}
    for m, sc in scorers.items():
        folder = out if len(methods) == 1 else out / m
        averages[m] = _write_bench(folder, m, sc, model, pretrained, got[m], rows[m])
    if len(methods) > 1:
        _write_bench_summary(out, model, averages)
        typer.echo(json.dumps({"out_dir": str(out), "methods": averages}))
    else:
        typer.echo(json.dumps({"out_dir": str(out), "average": averages[methods[0]]}))


_METRIC_COLUMNS = ("auroc", "fpr95", "aupr_in", "aupr_out")


def _metrics_of(got: dict[str, list[float]], id_set: str = "ID") -> tuple[dict[str, dict], dict[str, float]]:
    """Per OOD set metrics (ID = ``id_set``) and their average."""
    import numpy as np

    from clip_ood.metrics import ood_metrics

    results: dict[str, dict] = {}
    for k, v in got.items():
        if k == id_set:
            continue
        m = ood_metrics(got[id_set], v)
        m["n_id"], m["n_ood"] = len(got[id_set]), len(v)
        results[k] = m
    avg = {key: float(np.mean([r[key] for r in results.values()])) for key in _METRIC_COLUMNS}
    return results, avg


def _metrics_rows(first: str, named: list[tuple[str, dict]]) -> list[list[str]]:
    """Header + one row of the four metrics per (name, metrics)."""
    return [[first, *_METRIC_COLUMNS]] + [[k] + [f"{m[c]:.6f}" for c in _METRIC_COLUMNS] for k, m in named]


def _echo_table(results: dict[str, dict], avg: dict[str, float], title: str = "") -> None:
    if title:
        typer.echo(title, err=True)
    for k, m in list(results.items()) + [("average", avg)]:
        typer.echo(f"{k:>16}  AUROC {100 * m['auroc']:6.2f}  FPR95 {100 * m['fpr95']:6.2f}", err=True)


def _write_bench(out: Path, method: str, sc, model: str, pretrained: str, got: dict[str, list[float]],
                 rows: list) -> dict[str, float]:
    """One method's bench outputs in ``out``: metrics.json / .csv, scores.csv, calibration.json, plots."""
    import numpy as np

    from clip_ood.calibration import CALIBRATION_FILE, make_calibration, write_calibration
    from clip_ood.metrics import roc_points
    from clip_ood.plots import plot_roc_logfpr
    from vision.io import write_text_atomic
    from vision.viz import plot_roc_curve, plot_score_histograms

    out.mkdir(parents=True, exist_ok=True)
    results, avg = _metrics_of(got)
    for k, m in results.items():
        fpr, tpr = roc_points(got["ID"], got[k])
        plot_roc_curve(fpr, tpr, out / f"roc_{k}.png", auroc=m["auroc"])
        plot_score_histograms(np.array(got["ID"]), np.array(got[k]), out / f"hist_{k}.png", labels=("ID", k))
    plot_roc_logfpr({k: (got["ID"], got[k]) for k in results}, out / "roc_logfpr.png",
                    title=f"{method}: OOD ROC, ID = positive (n_id={len(got['ID'])})")
    summary = {"method": method, "model": model, "settings": sc.settings(), "per_set": results, "average": avg}
    if sc.state is not None:
        summary["ants"] = {"lambda": sc.state.lambda_, "tau": sc.state.tau, "far_bank": len(sc.state.far_texts),
                           "near_labels": len(sc.state.near_texts)}
    cal = make_calibration(sc, got["ID"], model_name=model, pretrained=pretrained or None,
                           fpr_at_threshold={k: results[k]["fpr95"] for k in results})
    write_calibration(cal, out / CALIBRATION_FILE)
    summary["calibration"] = {"file": str(out / CALIBRATION_FILE), "threshold": cal["threshold"], "tpr": cal["tpr"]}
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "metrics.csv", _csv_text(_metrics_rows("set", [*results.items(), ("average", avg)])))
    write_text_atomic(out / "scores.csv", _csv_text([["path", "set", "score"], *((p, k, f"{s:.6f}") for p, k, s in rows)]))
    _echo_table(results, avg, method)
    return avg


def _write_bench_summary(out: Path, model: str, averages: dict[str, dict[str, float]]) -> None:
    """Several methods: metrics.json / metrics.csv side by side (per-method detail in the sub-folders)."""
    from vision.io import write_text_atomic

    write_text_atomic(out / "metrics.json", json.dumps({"model": model, "methods": averages,
                                                        "folders": {m: str(out / m) for m in averages}}, indent=2))
    write_text_atomic(out / "metrics.csv", _csv_text(_metrics_rows("method", list(averages.items()))))


@ood_app.command("metrics")
def metrics_cmd(
    scores: Path = typer.Argument(..., help="A scores CSV with 'set' and 'score' columns (as `ood bench` writes)."),
    id_set: str = typer.Option("ID", "--id-set", help="The value of 'set' that marks in-distribution rows."),
    out: Path | None = typer.Option(None, "--out", help="Also write the metrics JSON here."),
) -> None:
    """Recompute FPR95 / AUROC / AUPR from a scores CSV (no model needed)."""
    import csv
    import math

    from vision.io import write_text_atomic

    got: dict[str, list[float]] = {}
    try:
        with open(scores, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"set", "score"} - set(reader.fieldnames or [])
            if missing:
                fail(f"{scores}: no {', '.join(sorted(missing))} column (header: {', '.join(reader.fieldnames or [])})")
            for line, row in enumerate(reader, start=2):
                try:
                    v = float(row["score"])
                except (TypeError, ValueError):
                    fail(f"{scores}:{line}: score {row['score']!r} is not a number")
                if not math.isfinite(v):
                    fail(f"{scores}:{line}: score {row['score']!r} is not finite")
                got.setdefault(row["set"], []).append(v)
    except FileNotFoundError:
        fail(f"{scores}: no such file")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fail(f"{scores}: cannot read it ({e})")
    if id_set not in got:
        fail(f"{scores}: no row with set '{id_set}' (sets: {', '.join(sorted(got)) or 'none'}; see --id-set)")
    if len(got) < 2:
        fail(f"{scores}: only the ID set '{id_set}'; an OOD set is needed")
    results, avg = _metrics_of(got, id_set)
    _echo_table(results, avg)
    summary = {"scores": str(scores), "id_set": id_set, "per_set": results, "average": avg}
    if out is not None:
        write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary))


@ood_app.command("serve", cls=_MethodCommand)
def serve(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pretrained: str = typer.Option("", "--pretrained", help=PRETRAINED_HELP),
    id_labels: Path = typer.Option(..., "--id-labels"),
    method: str = METHOD.option("neglabel"),
    neg_labels: Path | None = typer.Option(None, "--neg-labels"),
    num_negatives: int = typer.Option(10_000, "--num-negatives"),
    api_key: list[str] = typer.Option([], "--api-key", help="Accept this key (repeat for several). Visible in `ps`: "
                                      "prefer --api-key-file or $NEGVISION_API_KEY (comma-separated) outside tests."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="Accepted keys, one a line; re-read when "
                                             "it changes (rotate keys without a restart)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    workers: int = typer.Option(1, "--workers", min=1, help="uvicorn worker processes, each with its own model copy."),
    calibration: Path | None = typer.Option(None, "--calibration", help="calibration.json of `ood bench` (same "
                                            "model and labels): is_ood uses its threshold."),
    conf: float | None = typer.Option(None, "--conf", "--threshold", help="A fixed threshold instead: is_ood = "
                                      "score < conf. Neither: is_ood is null, threshold 'uncalibrated'."),
    max_images: int = typer.Option(32, "--max-images", min=1, help="Images per request."),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", min=0.001, help="Bytes per request (MiB)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Pixels per image (decompression bombs)."),
    max_request_mp: float = typer.Option(64.0, "--max-request-mp", min=0.000001,
                                         help="Decoded megapixels per request, all images together."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Images per micro-batched encoder call."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, help="How long to gather concurrent requests."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Images waiting for the encoder; more -> 503."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="Seconds per request; more -> 504."),
    max_failures: int = typer.Option(3, "--max-failures", min=1, help="Model errors in a row before /readyz is 503."),
    decode_threads: int = typer.Option(2, "--decode-threads", min=1, help="Threads decoding uploads per worker."),
    describer: str = DESCRIBER.option("lexicon"),
    describer_model: str | None = typer.Option(None, "--describer-model"),
    ants_mode: str = ANTS_MODE.option("ada"),
    ants_state: Path | None = typer.Option(None, "--ants-state", help="ANTS: load the state at start, save it at "
                                           "shutdown (--workers 1 only: each worker has its own state)."),
    id_template: list[str] = _id_template_option(),
    neg_template: list[str] = _neg_template_option(),
    temperature: float | None = _temperature_option(),
    device: str | None = opt.device_option(),
) -> None:
    """Serve the scoring API (FastAPI; OpenAPI docs at /docs; /healthz, /readyz, /metrics)."""
    import logging

    from clip_ood.api import ApiKeys, is_loopback
    from clip_ood.serve import ServeConfig

    log = logging.getLogger("negvision.api")
    dev = opt.resolve_device(device)
    prompts = _prompts(id_template, neg_template, temperature)
    if conf is not None and calibration is not None:
        usage_error("give --calibration or --conf, not both")
    if ants_state is not None and workers > 1:
        usage_error("--ants-state needs --workers 1: each worker process keeps its own ANTS state")
    try:
        keys = ApiKeys(api_key, api_key_file)
    except ValueError as e:
        fail(str(e))
    if not keys.enabled and not is_loopback(host):
        log.warning("WARNING: serving on %s without an API key: anyone who can reach this port can use it "
                    "(set --api-key-file or $NEGVISION_API_KEY)", host)
    import uvicorn

    from clip_ood.calibration import CalibrationError
    from clip_ood.serve import build_app, run_workers

    labels = _id_labels(id_labels)
    enc = load_encoder_or_fail(model, pretrained, dev)
    neg = _negatives(enc, labels, method, neg_labels, num_negatives, 0.95, None, prompts)
    sc = _scorer(enc, labels, method, neg, describer, describer_model, ants_mode, ants_state, prompts=prompts)
    cfg = ServeConfig(model=model, pretrained=pretrained or None, id_labels=labels, method=method,
                      neg_labels_file=str(neg_labels) if neg_labels else None, describer=describer,
                      describer_model=describer_model, ants_mode=ants_mode,
                      ants_state=str(ants_state) if ants_state else None, device=dev, api_keys=keys.static,
                      api_key_file=str(api_key_file) if api_key_file else None, threshold=conf,
                      calibration_file=str(calibration) if calibration else None,
                      limits={"max_images": max_images, "max_request_bytes": int(max_request_mb * 1024 * 1024),
                              "max_pixels": max_pixels, "max_request_pixels": int(max_request_mp * 1_000_000)},
                      serve={"max_queue": max_queue, "timeout_s": timeout, "max_failures": max_failures,
                             "decode_threads": decode_threads},
                      max_batch=max_batch, batch_wait_ms=batch_wait_ms, id_templates=prompts.id_templates,
                      neg_templates=prompts.neg_templates, temperature=prompts.temperature)
    try:
        app = build_app(cfg, scorer=sc)
    except (CalibrationError, ValueError) as e:
        fail(str(e))
    mode = "calibrated threshold" if calibration else "fixed threshold" if conf is not None else "no threshold"
    log.info("serving %s / %s on http://%s:%d (%s, %d worker%s, auth %s)", model, method, host, port, mode, workers,
             "s" if workers > 1 else "", "on" if keys.enabled else "off")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        if ants_state is not None and sc.state is not None:
            sc.state.save(ants_state)
            typer.echo(f"ANTS state saved to {ants_state.with_suffix('.json')}", err=True)
        return
    del app, sc, enc  # checked: the workers load their own copies
    run_workers(cfg, neg, host, port, workers)
