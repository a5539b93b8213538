"""Local diffusers pipeline folders: checked before diffusers loads them, so a damaged folder is one error naming the
file (diffusers reports most of these as a missing download)."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def check_pipeline_folder(path: str | os.PathLike) -> dict:
    """The parsed model_index.json of a pipeline folder, after checking that every component it lists has its
    sub-folder and that no weights file there is cut short. ``FileNotFoundError`` / ``ValueError`` (a
    ``CheckpointCorruptError`` for a damaged weights file) naming the file otherwise."""
    from vision.io import read_json
    from vision.weights_io import check_weights_file

    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"'{path}' is not a diffusers pipeline folder (no model_index.json); save one with "
                                "pipeline.save_pretrained(DIR) or download one with `huggingface-cli download ID "
                                "--local-dir DIR`")
    index = read_json(index_file)
    if not isinstance(index, dict):
        raise ValueError(f"{index_file}: must hold a JSON object")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue  # metadata, or a component set to None (e.g. no safety checker)
        sub = path / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{index_file} lists the component '{name}' but {sub} is missing")
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                check_weights_file(f)
    return index


# negvision's pipeline subclasses that a model_index.json may name (diffusers itself only resolves its own classes)
NEGVISION_PIPELINES = {
    "PerpNegStableDiffusionPipeline": "diffusion.perpneg.pipeline",
    "PerpNegStableDiffusionXLPipeline": "diffusion.perpneg.pipeline_xl",
    "PerpNegStableDiffusion3Pipeline": "diffusion.perpneg.pipeline_sd3",
    "PerpNegFluxPipeline": "diffusion.perpneg.pipeline_flux",
}


def pipeline_class(class_name: str) -> type:
    """The pipeline class a model_index.json names: one of negvision's, a diffusers one, else DiffusionPipeline (which
    then resolves the name itself, or says why it cannot)."""
    import importlib

    import diffusers

    if class_name in NEGVISION_PIPELINES:
        return getattr(importlib.import_module(NEGVISION_PIPELINES[class_name]), class_name)
    cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline):
        return cls
    return diffusers.DiffusionPipeline


def null_components(index: dict, cls: type) -> dict:
    """``{name: None}`` for the components model_index.json saved as ``[null, null]`` that ``cls`` expects (SD3 without
    its T5: text_encoder_3 / tokenizer_3): diffusers' from_pretrained restores them only when passed as None."""
    import diffusers

    expected = set(cls._get_signature_keys(cls)[0]) if cls is not diffusers.DiffusionPipeline else set(index)
    return {k: None for k, v in index.items()
            if k in expected and not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None
            and v[1] is None}
