"""``negvision data``: make the sample data sets, check a folder, report what is in it."""

from __future__ import annotations

from pathlib import Path

import typer

from vision.cli_common import EXIT_USER_ERROR, fail, report_error
from vision.cli_options import RegistryChoice, registry_command

# choices read from the registries when they are needed: a new writable format or defect family needs no edit here
DIGITS_FORMAT = RegistryChoice("--format", "vision.data.formats:format_names", "detection format to write",
                               args=("detection", True))
DEFECT_FAMILY = RegistryChoice("--family", "vision.data.defects:FAMILIES", "defect family")
ANY_FORMAT = RegistryChoice("--format", "vision.data.formats:FORMATS", "data format (default: auto-detected)")


app = typer.Typer(help="Data sets: make the sample digits set, check a folder, report what is in it.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command("make-digits", cls=registry_command(fmt=DIGITS_FORMAT))
def make_digits_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmt: str = DIGITS_FORMAT.option("coco"),
    n_train: int = typer.Option(200, "--n-train"),
    n_val: int = typer.Option(50, "--n-val"),
    img_size: int = typer.Option(256, "--img-size"),
    seed: int = typer.Option(0, "--seed"),
    max_objects: int = typer.Option(8, "--max-objects"),
) -> None:
    """MNIST digits pasted on real photos/textures: 10 classes, 1-8 objects per image, train + val splits."""
    from vision.data.digits import make_digits

    path = make_digits(out, format=fmt, n_train=n_train, n_val=n_val, img_size=img_size, seed=seed,
                       max_objects=max_objects)
    typer.echo(f"digits set ({fmt}, {n_train} train / {n_val} val, {img_size}px) -> {path}")


@app.command("make-defects", cls=registry_command(family=DEFECT_FAMILY))
def make_defects_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (images/, masks/, labels.csv)."),
    n_train: int = typer.Option(200, "--n-train"),
    n_test: int = typer.Option(100, "--n-test"),
    img_size: int = typer.Option(128, "--img-size"),
    seed: int = typer.Option(0, "--seed"),
    defect_fraction: float = typer.Option(0.3, "--defect-fraction", help="Share of defective images."),
    image_level_fraction: float = typer.Option(0.3, "--image-level-fraction",
                                               help="Share of defective training images marked image-level only."),
    family: str = DEFECT_FAMILY.option("marks"),
) -> None:
    """DAGM-style surface set with pixel masks: visible marks on real and procedural textures (default), or
    texture-statistics defects on stochastic textures: --family marks (visible scratches, spots, cracks, stains),
    local_texture (a blob or band whose texture orientation, scale, contrast or grain differs, mean kept) or
    global_texture (the whole image's texture statistics shifted slightly, full-image masks)."""
    from vision.data.defects import make_defects

    path = make_defects(out, n_train=n_train, n_test=n_test, img_size=img_size, seed=seed,
                        defect_fraction=defect_fraction, image_level_fraction=image_level_fraction,
                        family=family)
    typer.echo(f"defect set ({family}, {n_train} train / {n_test} test, {img_size}px) -> {path}")


@app.command("check")
def check_cmd(
    data: Path = typer.Option(..., "--data", help="COCO json/folder, YOLO data.yaml/folder, VOC or LabelMe folder."),
    split: list[str] = typer.Option([], "--split", help="Check only this split (repeatable); default: every split."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Report every bad item (and what training with "
                                  "--skip-bad would keep) instead of the first 20."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode every image again, ignoring the index cache."),
) -> None:
    """Validate a data set the way training will: every split, every image fully decoded (cached). Detection
    formats (COCO, YOLO, VOC, LabelMe) and the defect layouts of `negvision defect` are recognised."""
    from vision.data import DETECTION_SPLITS, DatasetError, load_detection_dataset
    from vision.data.defect_split import DEFECT_SPLITS, check_defect_split
    from vision.data.formats import resolve_format

    try:
        fmt = resolve_format(data)
    except DatasetError as e:
        fail(str(e))

    def detection(s: str) -> tuple[str, list[str]]:
        ds = load_detection_dataset(data, s, skip_bad=skip_bad, format=fmt.name, cache=not no_cache)
        n_boxes = sum(len(ds.annotations(i)[1]) for i in range(len(ds)))
        return (f"format {ds.format}, split {s}: {len(ds)} images, {n_boxes} boxes, {len(ds.classes)} classes\n"
                + ds.summary()), ds.bad

    def defect(s: str) -> tuple[str, list[str]]:
        res = check_defect_split(data, s, fmt.name, skip_bad=skip_bad, cache=not no_cache)
        pos = sum(1 for x in res.samples if x.label == 1)
        masked = sum(1 for x in res.samples if x.label == 1 and x.has_mask and x.segmented)
        return (f"format {fmt.name}, split {s}: {len(res.samples)} images, {pos} defective ({masked} with pixel "
                f"masks), {len(res.samples) - pos} defect-free" + (f"; skipped {len(res.bad)} bad" if res.bad else "")
                ), res.bad

    if fmt.task == "detection":
        _check_splits(data, fmt.name, list(split) or list(DETECTION_SPLITS), bool(split), detection)
    else:
        _check_splits(data, fmt.name, list(split) or list(DEFECT_SPLITS), bool(split), defect)


def _check_splits(data: Path, fmt: str, splits: list[str], named: bool, check) -> None:
    """Run ``check(split) -> (summary, bad items)`` on each split; exit 1 on any problem or when none exists."""
    import time

    from vision.data.formats import DatasetError, SplitNotFoundError

    t0 = time.perf_counter()
    found, n_bad, failed = 0, 0, False
    for s in splits:
        try:
            summary, bad = check(s)
        except SplitNotFoundError as e:
            if named:  # asked for by name
                report_error(str(e))
                failed = True
            continue
        except (DatasetError, ValueError) as e:
            found += 1
            failed = True
            report_error(str(e), where=f"split {s}")
            continue
        found += 1
        typer.echo(summary)
        for msg in bad:
            typer.echo(f"  bad: {msg}")
        n_bad += len(bad)
    if found == 0 and not failed:
        fail(f"{data}: no split of {', '.join(splits)} found ({fmt} format)")
    typer.echo(f"checked in {time.perf_counter() - t0:.1f} s" + (f"; {n_bad} bad items" if n_bad else ""))
    if failed or n_bad:
        raise typer.Exit(EXIT_USER_ERROR)


@app.command("report", cls=registry_command(fmt=ANY_FORMAT))
def report_cmd(
    data: Path = typer.Option(..., "--data", help="A detection folder (COCO, YOLO, VOC, LabelMe) or a defect layout."),
    out: Path = typer.Option(Path("report"), "--out", help="Report folder: report.html (self-contained) and "
                             "report.json."),
    fmt: str = ANY_FORMAT.option(None),
    img_size: int = typer.Option(640, "--img-size", min=32, help="Training resolution (longer side) box sizes are "
                                 "given at."),
    split: list[str] = typer.Option([], "--split", help="Report only this split (repeatable); default: every split."),
    near_threshold: int = typer.Option(2, "--near-threshold", min=0, max=64, help="Perceptual-hash distance (bits of "
                                       "64) at or below which two images are near duplicates."),
    overlap_iou: float = typer.Option(0.9, "--overlap-iou", min=0.0, max=1.0, help="Two same-class boxes of one image "
                                      "above this IoU are reported as a probable double label."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a section finds a severe problem (duplicates "
                                "across splits)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and bad boxes (listed in the "
                                  "report) instead of stopping at them."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode every image again, ignoring the index cache."),
    weights: Path | None = typer.Option(None, "--weights", help="A trained detector (run folder, checkpoint or "
                                        "model.safetensors): adds the label issues its predictions point to "
                                        "(missing box, wrong class, badly placed box; cleanlab)."),
) -> None:
    """What is in a data folder and what is wrong with it: counts per split and class, box sizes at --img-size against
    the ATSS anchors, duplicates within and across splits (leakage), tiny boxes and double labels, and the sections
    of the other packages (what the ATSS assigner does with the boxes; with --weights, the images most likely
    mislabelled). Writes OUT/report.html and OUT/report.json."""
    from vision.data import DatasetError
    from vision.data.report import ReportWriteError, make_report

    if weights is not None and not weights.exists():
        fail(f"--weights '{weights}' does not exist (expected a run folder, a checkpoint folder or a weights file)")
    try:
        res = make_report(data, out, format=fmt, img_size=img_size, splits=list(split) or None,
                          near_threshold=near_threshold, skip_bad=skip_bad, strict=strict, cache=not no_cache,
                          options={"overlap_iou": overlap_iou, "weights": str(weights) if weights else None})
    except (DatasetError, ReportWriteError) as e:
        from vision.data.formats.base import SKIP_HINT

        fail(str(e).replace(SKIP_HINT, "(--skip-bad skips bad items and lists them in the report)"))
    typer.echo(_report_headline(data, res))
    if res["strict_failed"]:
        titles = ", ".join(res["titles"][n] for n in res["headline"]["severe"])
        fail(f"--strict: severe problems in {titles} (see {res['report_html']})")


def _report_headline(data: Path, res: dict) -> str:
    """The lines ``data report`` prints: splits, leakage, each section's problems (the first few), the report path."""
    head = res["headline"]
    parts = []
    for s, v in head["splits"].items():
        extra = f", {v['boxes']} boxes" if "boxes" in v else f", {v['defective']} defective"
        parts.append(f"{s} {v['images']} images{extra}")
    a = head["duplicates_across_splits"]
    lines = [f"{data} ({res['format']}): " + "; ".join(parts)]
    leak = "LEAKAGE: " if a["exact"] or a["near"] else ""
    lines.append(f"{leak}duplicates across splits: {a['exact']} exact, {a['near']} near ({a['images']} images)")
    for name, problems in res["sections"].items():
        if not problems:
            continue
        sev = " [severe]" if name in head["severe"] else ""
        lines.append(f"{res['titles'][name]}{sev}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
        lines += [f"  {p}" for p in problems[:5]]
        if len(problems) > 5:
            lines.append(f"  ... and {len(problems) - 5} more")
    lines += [f"note: {n}" for n in res["notes"]]
    lines.append(f"report: {res['report_html']} (figures: {res['report_json']})")
    return "\n".join(lines)
