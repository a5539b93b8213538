"""Running the scoring API: one config shared by the ``ood serve`` command and its uvicorn worker processes.

``--workers 1`` builds the app in the command's process. ``--workers N`` prepares everything once (labels read,
negatives mined and saved, calibration checked), writes the config to a private temporary folder and starts uvicorn
with N worker processes through :func:`app_from_env`; each worker loads its own model copy (and keeps its own ANTS
state), and ``/metrics`` sums all of them (``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "NEGVISION_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """Everything a worker process needs to build the same app (JSON; holds the API keys: keep it private)."""

    model: str
    pretrained: str | None
    id_labels: list[str]
    method: str
    neg_labels_file: str | None = None
    describer: str = "lexicon"
    describer_model: str | None = None
    ants_mode: str = "ada"
    ants_state: str | None = None
    device: str | None = None
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None
    threshold: float | None = None
    calibration_file: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    id_templates: list[str] = field(default_factory=list)
    neg_templates: list[str] = field(default_factory=list)
    temperature: float | None = None

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def make_scorer(encoder: Any, labels: list[str], method: str, negatives: Any, describer: str = "lexicon",
                describer_model: str | None = None, mode: str = "ada", ants_state: str | Path | None = None,
                seed: int = 0, id_templates: list[str] | None = None, neg_templates: list[str] | None = None,
                temperature: float | None = None) -> Any:
    """An ``OODScorer`` (with its ANTS describer and state); ``ValueError`` with a one-line reason."""
    from clip_ood.scorer import OODScorer

    sc = OODScorer(encoder, labels, method=method, negatives=negatives, seed=seed, id_templates=id_templates,
                   neg_templates=neg_templates, temperature=temperature)
    if sc.state is not None:
        from clip_ood.describers import create_describer

        kw: dict[str, Any] = {"encoder": encoder} if describer == "lexicon" else {}
        if describer_model and describer != "lexicon":
            kw["model"] = describer_model
        sc.state.describer = create_describer(describer, **kw)
        sc.state.mode = mode
        if ants_state is not None and Path(ants_state).with_suffix(".json").is_file():
            sc.state.load(ants_state)
    return sc


def build_app(cfg: ServeConfig, scorer: Any = None) -> Any:
    """The FastAPI app of ``cfg`` (the scorer built from it unless passed in); ``ValueError`` for a bad key file or
    a calibration made for another model."""
    from clip_ood.api import ApiKeys, ApiLimits, ServeLimits, create_app
    from clip_ood.calibration import check_calibration, read_calibration

    if scorer is None:
        from clip_ood.encoders import load_encoder
        from clip_ood.lexicon import NegativeLabels

        encoder = load_encoder(cfg.model, pretrained=cfg.pretrained or None, device=cfg.device)
        negatives = NegativeLabels.load(cfg.neg_labels_file) if cfg.neg_labels_file else None
        scorer = make_scorer(encoder, cfg.id_labels, cfg.method, negatives, cfg.describer, cfg.describer_model,
                             cfg.ants_mode, cfg.ants_state, id_templates=cfg.id_templates or None,
                             neg_templates=cfg.neg_templates or None, temperature=cfg.temperature)
    cal = None
    if cfg.calibration_file:
        cal = check_calibration(read_calibration(cfg.calibration_file), scorer, cfg.calibration_file)
    keys = ApiKeys(cfg.api_keys, cfg.api_key_file, use_env=False)
    return create_app(scorer, api_key=keys, threshold=cfg.threshold, calibration=cal, limits=ApiLimits(**cfg.limits),
                      serve=ServeLimits(**cfg.serve), max_batch=cfg.max_batch, batch_wait_ms=cfg.batch_wait_ms,
                      model_name=cfg.model)


def app_from_env() -> Any:
    """uvicorn factory of the worker processes: the app of the config file named by ``$NEGVISION_SERVE_CONFIG``."""
    from vision.cli_common import setup_logging

    setup_logging(0)
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start the server with `negvision ood serve`")
    return build_app(ServeConfig.load(path))


def run_workers(cfg: ServeConfig, negatives: Any, host: str, port: int, workers: int) -> None:
    """uvicorn with ``workers`` processes building the app from ``cfg`` (the negatives saved once for them, their
    metrics summed); the private folder holding the config (and its keys) is removed at exit."""
    import gc
    import shutil
    import tempfile

    import torch
    import uvicorn

    tmp = Path(tempfile.mkdtemp(prefix="negvision-serve-"))  # 0700: the config holds the keys
    try:
        if negatives is not None and cfg.neg_labels_file is None:
            negatives.save(tmp / "neg.txt")
            cfg.neg_labels_file = str(tmp / "neg.txt")
        cfg.save(tmp / "config.json")
        (tmp / "prometheus").mkdir()
        os.environ[CONFIG_ENV] = str(tmp / "config.json")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "prometheus")
        gc.collect()  # the command's own model copy, used for the checks, goes before the workers load theirs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        uvicorn.run("clip_ood.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="info")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
