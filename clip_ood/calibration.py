"""Calibrated OOD decision thresholds: ``ood bench`` writes ``calibration.json``, ``ood serve`` / ``ood score`` use it.

Score ranges differ between methods and models (NegLabel lives in [0, 1] near 1 for ID, MCM near 1 / C, energy is
unbounded), so one fixed threshold is wrong for all but one. The calibrated threshold is the one that keeps
``tpr`` (default 95 %) of the ID images, ``clip_ood.metrics.fpr_at_tpr``'s threshold, the point FPR95 is measured at.
The file names what it was made for (method, model, ID labels, negative labels, temperature, templates); using it
with anything else is refused, naming the field that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
FORMAT = "negvision-ood-calibration/1"
_MATCHED = ("method", "model", "id_labels_sha256", "neg_labels_sha256", "temperature", "id_templates",
            "neg_templates")


class CalibrationError(ValueError):
    """A calibration file that cannot be read or was made for another model / label set."""


def _sha(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def model_identity(encoder: Any) -> str:
    """A model identity that travels between machines: the encoder's cache key with absolute paths reduced to file
    names (the key holds name, weights file / folder with sizes, precision and seed)."""
    key = getattr(encoder, "cache_key", None) or type(encoder).__name__
    parts = []
    for part in key.split("|"):
        fields = []
        for f in part.split(";"):
            bits = f.split(":")
            if len(bits) >= 3 and os.path.isabs(":".join(bits[:-2])):
                # "/abs/path/file:size:mtime" -> "file:size" (the mtime changes with a copy)
                fields.append(f"{os.path.basename(':'.join(bits[:-2]))}:{bits[-2]}")
            elif os.path.isabs(f) or (f.startswith("local-dir:") and os.path.isabs(f[10:])):
                fields.append(("local-dir:" if f.startswith("local-dir:") else "") + os.path.basename(f.rstrip("/")))
            else:
                fields.append(f)
        parts.append(";".join(fields))
    return "|".join(parts)


def scorer_fingerprint(scorer: Any) -> dict[str, Any]:
    """What a threshold depends on: method, model, ID and negative labels, temperature and ID templates."""
    neg = scorer.negatives
    return {
        "method": scorer.method,
        "model": model_identity(scorer.encoder),
        "id_labels_sha256": _sha(list(scorer.id_labels)),
        "neg_labels_sha256": _sha([f"{p}\t{w}" for p, w in zip(neg.pos, neg.words, strict=True)]),
        "temperature": float(scorer.temperature),
        "id_templates": list(getattr(scorer, "id_templates", ())),
        "neg_templates": list(getattr(scorer, "neg_templates", None) or []),
    }


def make_calibration(scorer: Any, id_scores: Any, tpr: float = 0.95, **extra: Any) -> dict[str, Any]:
    """The calibration of ``scorer`` from its scores on ID images: the threshold keeping ``tpr`` of them."""
    import numpy as np

    from clip_ood.metrics import fpr_at_tpr

    s = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise CalibrationError("no ID scores to calibrate on")
    _, thr = fpr_at_tpr(s, s[:1], tpr)
    return {"format": FORMAT, **scorer_fingerprint(scorer), "threshold": float(thr), "tpr": float(tpr),
            "rule": "is_ood = score < threshold; the threshold keeps tpr of the ID images", "n_id": int(s.size),
            "num_id_labels": len(scorer.id_labels), "num_neg_labels": len(scorer.negatives), **extra}


def write_calibration(cal: dict[str, Any], path: str | Path) -> Path:
    """Atomic JSON write."""
    from vision.io import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(cal, indent=2) + "\n")
    return path


def read_calibration(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a calibration file; ``CalibrationError`` naming the file otherwise."""
    path = Path(path)
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file (`negvision ood bench` writes one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable calibration file ({e})") from e
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a negvision calibration file (format {FORMAT!r} expected)")
    thr = cal.get("threshold")
    if not isinstance(thr, int | float) or isinstance(thr, bool) or thr != thr or thr in (float("inf"), -float("inf")):
        raise CalibrationError(f"{path}: threshold must be a finite number, got {thr!r}")
    missing = [k for k in _MATCHED if k not in cal]
    if missing:
        raise CalibrationError(f"{path}: missing {', '.join(missing)}")
    return cal


def check_calibration(cal: dict[str, Any], scorer: Any, path: str | Path = CALIBRATION_FILE) -> dict[str, Any]:
    """``cal`` if it was made for ``scorer``; else ``CalibrationError`` naming every field that differs."""
    want = scorer_fingerprint(scorer)
    diff = []
    for k in _MATCHED:
        a, b = cal.get(k), want[k]
        same = abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b))) if k == "temperature" else a == b
        if not same:
            show = (lambda v: v[:12] + "...") if k.endswith("sha256") else (lambda v: v)
            diff.append(f"{k} {show(a)!r} (file) vs {show(b)!r} (now)")
    if diff:
        raise CalibrationError(f"{path} was made for another model or label set: " + "; ".join(diff)
                               + " (re-run `negvision ood bench` with this model and labels)")
    return cal
