"""``negvision data``: make the sample data sets, check a detection folder."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Data sets: make the sample digits set, check a folder.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command("make-digits")
def make_digits_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmt: str = typer.Option("coco", "--format", help="coco | yolo | voc"),
    n_train: int = typer.Option(200, "--n-train"),
    n_val: int = typer.Option(50, "--n-val"),
    img_size: int = typer.Option(256, "--img-size"),
    seed: int = typer.Option(0, "--seed"),
    max_objects: int = typer.Option(8, "--max-objects"),
) -> None:
    """MNIST digits pasted on real photos/textures: 10 classes, 1-8 objects per image, train + val splits."""
    from vision.data.digits import make_digits

    if fmt not in ("coco", "yolo", "voc"):
        typer.echo(f"error: --format must be coco, yolo or voc (got '{fmt}')", err=True)
        raise typer.Exit(1)
    path = make_digits(out, format=fmt, n_train=n_train, n_val=n_val, img_size=img_size, seed=seed,
                       max_objects=max_objects)
    typer.echo(f"digits set ({fmt}, {n_train} train / {n_val} val, {img_size}px) -> {path}")


@app.command("make-defects")
def make_defects_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (images/, masks/, labels.csv)."),
    n_train: int = typer.Option(200, "--n-train"),
    n_test: int = typer.Option(100, "--n-test"),
    img_size: int = typer.Option(128, "--img-size"),
    seed: int = typer.Option(0, "--seed"),
    defect_fraction: float = typer.Option(0.3, "--defect-fraction", help="Share of defective images."),
    image_level_fraction: float = typer.Option(0.3, "--image-level-fraction",
                                               help="Share of defective training images marked image-level only."),
) -> None:
    """DAGM-style surface set: real and procedural textures with scratches, spots, cracks and stains, pixel masks."""
    from vision.data.defects import make_defects

    path = make_defects(out, n_train=n_train, n_test=n_test, img_size=img_size, seed=seed,
                        defect_fraction=defect_fraction, image_level_fraction=image_level_fraction)
    typer.echo(f"defect set ({n_train} train / {n_test} test, {img_size}px) -> {path}")


@app.command("check")
def check_cmd(
    data: Path = typer.Option(..., "--data"),
    split: str = typer.Option("train", "--split"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Report every bad item instead of stopping at the first."),
) -> None:
    """Load a detection folder (auto-detected format) and report classes, images, boxes and bad items."""
    from vision.data import DatasetError, load_detection_dataset

    try:
        ds = load_detection_dataset(data, split, skip_bad=skip_bad)
    except DatasetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    n_boxes = sum(len(ds.annotations(i)[1]) for i in range(len(ds)))
    typer.echo(f"format {ds.format}, split {split}: {len(ds)} images, {n_boxes} boxes, {len(ds.classes)} classes")
    typer.echo(ds.summary())
    if ds.bad:
        raise typer.Exit(1)
