"""Shared CLI helpers, image listing / EXIF-aware reading and atomic writes of clip_ood."""

import os
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from clip_ood import cli_common
from clip_ood.data import IMAGE_EXTENSIONS, BadImageError, iter_batches, list_images, load_image
from vision.io import ImageReadError

OLD_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".jfif"}


def _exif_rotated(path: Path, size=(8, 4)) -> None:
    """A landscape image whose EXIF says 'rotate 90' (orientation 6): displayed portrait."""
    im = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", exif=exif)


# ---------------------------------------------------------------------- CLI helpers
def test_one_model_help_and_encoder_loader_for_both_clis():
    from clip_ood import cli as ood_cli
    from clip_ood.dcar import cli as dcar_cli

    for mod in (ood_cli, dcar_cli):
        assert mod.MODEL_HELP is cli_common.MODEL_HELP and mod.load_encoder_or_fail is cli_common.load_encoder_or_fail
        assert not hasattr(mod, "_fail") and not hasattr(mod, "_encoder")


def test_load_encoder_or_fail_exit_1_names_the_model(tmp_path, capsys):
    with pytest.raises(typer.Exit) as e:
        cli_common.load_encoder_or_fail(f"local-dir:{tmp_path / 'nope'}", "", "cpu")
    assert e.value.exit_code == 1 and "cannot load model 'local-dir:" in capsys.readouterr().err


def test_load_encoder_or_fail_takes_the_local_gpu_under_a_launcher(monkeypatch):
    import clip_ood.encoders

    seen = {}
    monkeypatch.setattr(clip_ood.encoders, "load_encoder", lambda m, pretrained=None, device=None: seen.update(
        device=device, pretrained=pretrained) or "enc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli_common.load_encoder_or_fail("m", "", None) == "enc"
    assert seen == {"device": "cuda:1", "pretrained": None}
    cli_common.load_encoder_or_fail("m", "openai", "cpu")  # an explicit --device wins
    assert seen == {"device": "cpu", "pretrained": "openai"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli_common.load_encoder_or_fail("m", "", None)
    assert seen["device"] is None
    assert cli_common.dist_env() == (0, 1, 1)


def test_retrieval_bad_method_is_a_usage_error(tmp_path):
    from clip_ood.dcar.cli import retrieval_app

    r = CliRunner().invoke(retrieval_app, ["train", "--model", "m", "--data", str(tmp_path / "x.csv"), "--method",
                                           "clip", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'clip' is not one of" in r.output  # an enum: click lists the allowed values
    assert "'dcar'" in r.output and "'coop'" in r.output


# ---------------------------------------------------------------------- images
def test_listing_keeps_the_accepted_extensions(tmp_path):
    assert set(IMAGE_EXTENSIONS) == OLD_IMAGE_EXTS
    (tmp_path / "sub").mkdir()
    for name in ("a.JPG", "b.gif", "c.ppm", "sub/d.jfif", "e.webp", "f.txt", "g.svg", "sub/h.tiff"):
        (tmp_path / name).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.JPG", "b.gif", "c.ppm", "e.webp", "sub/d.jfif", "sub/h.tiff"]
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty") == []
    (tmp_path / "list.txt").write_text("sub/d.jfif 1\n# comment\nb.gif\n")
    assert list_images(tmp_path / "list.txt") == [tmp_path / "sub/d.jfif", tmp_path / "b.gif"]


def test_scoring_reads_images_upright_and_names_bad_files(tmp_path):
    _exif_rotated(tmp_path / "rot.jpg")
    assert load_image(tmp_path / "rot.jpg").size == (4, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(BadImageError, match="broken.png") as e:
        load_image(tmp_path / "broken.png")
    assert isinstance(e.value, ImageReadError) and isinstance(e.value, ValueError)
    with pytest.warns(UserWarning, match="broken.png"):
        batches = list(iter_batches([tmp_path / "broken.png", tmp_path / "rot.jpg"], 4, skip_bad=True))
    assert [p.name for p in batches[0][0]] == ["rot.jpg"] and batches[0][1][0].size == (4, 8)


def test_dcar_dataset_reads_images_upright(tmp_path):
    from clip_ood.dcar.data import Pair, PairDataError, PairDataset

    _exif_rotated(tmp_path / "rot.jpg")
    (tmp_path / "bad.png").write_bytes(b"")
    ds = PairDataset([Pair(str(tmp_path / "rot.jpg"), "a red thing", line=2),
                      Pair(str(tmp_path / "bad.png"), "x", line=3)], lambda im: torch.tensor(im.size))
    assert ds.image(0).tolist() == [4, 8]
    with pytest.raises(PairDataError, match=r"line 3: cannot read image .*bad.png"):
        ds.image(1)


# ---------------------------------------------------------------------- atomic writes
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_outputs_are_atomic_and_honour_the_umask(tmp_path, tiny_encoder, umask_027):
    from clip_ood.encoders import encode_labels
    from clip_ood.lexicon import NegativeLabels

    neg = NegativeLabels(["stone", "shiny"], ["noun", "adj"])
    neg.save(tmp_path / "lab" / "neg.txt")
    assert (tmp_path / "lab" / "neg.txt").read_text() == "noun\tstone\nadj\tshiny\n"
    first = encode_labels(tiny_encoder, ["apple", "leaf"], ("{}",), cache_dir=tmp_path / "cache")
    again = encode_labels(tiny_encoder, ["apple", "leaf"], ("{}",), cache_dir=tmp_path / "cache")
    assert torch.equal(first, again)
    files = _files(tmp_path)
    assert len(files) == 2 and files[1] == "lab/neg.txt" and files[0].startswith("cache/")  # no temp files left
    for f in files:
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o640, f


def test_prompts_and_ants_state_are_atomic(tmp_path, tiny_encoder, umask_027):
    from clip_ood.ants import ANTSState
    from clip_ood.dcar.prompts import DualPromptCLIP
    from clip_ood.dcar.train import load_prompts, save_prompts
    from clip_ood.describers import ScriptedDescriber

    learner = DualPromptCLIP(tiny_encoder.model, tiny_encoder.tokenizer, n_ctx=2)
    save_prompts(learner, tmp_path / "run", {"method": "coop"})
    back = load_prompts(tmp_path / "run", tiny_encoder.model, tiny_encoder.tokenizer)
    assert torch.equal(back.ctx, learner.ctx)
    st = ANTSState(tiny_encoder, ["apple"], torch.randn(1, 32), torch.randn(3, 32), describer=ScriptedDescriber())
    st.save(tmp_path / "ants" / "state")
    assert _files(tmp_path) == ["ants/state.json", "ants/state.safetensors", "run/prompts.json",
                                "run/prompts.safetensors"]
    for f in _files(tmp_path):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o640, f


# ---------------------------------------------------------------------- imports
def _imports_of_clip_ood() -> dict[str, set[str]]:
    """Every ``clip_ood`` module -> the ``clip_ood`` modules it imports (module level or inside functions)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    mods = {}
    for p in (root / "clip_ood").rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph = {}
    for name, (p, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def test_clip_ood_has_no_import_circle():
    graph = _imports_of_clip_ood()
    assert {"clip_ood.ants", "clip_ood.scores", "clip_ood.api.service"} <= set(graph)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert circles == []
    assert "clip_ood.scores" not in graph["clip_ood.ants"]  # ANTS registers itself; scores imports it
