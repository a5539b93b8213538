"""The OOD score registry: a new score is one decorated function, used by OODScorer, the CLI and the API."""

import asyncio
import io
import re

import httpx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip_ood import cli as ood_cli
from clip_ood.lexicon import NegativeLabels
from clip_ood.scorer import OODScorer
from clip_ood.scores import SCORES, ScoreInputs, mcm_score, neglabel_score, register_score

METHOD_COMMANDS = {  # the commands with --method, and their other required options
    "score": ["--model", "m", "--id-labels", "x", "--source", "s"],
    "bench": ["--model", "m", "--id-dir", "i", "--ood-dir", "o"],
    "serve": ["--model", "m", "--id-labels", "x"],
}


@pytest.fixture
def scratch_scores():
    """Scores registered inside a test are removed from the registry afterwards."""
    before = set(SCORES.names())
    yield SCORES
    for name in set(SCORES.names()) - before:
        SCORES.unregister(name)


def _negatives(n=12):
    return NegativeLabels([f"thing{i}" for i in range(n)], ["noun"] * n)


def test_builtin_methods_and_specs():
    assert SCORES.names() == ["ants", "energy", "max_logit", "mcm", "neglabel"]
    assert {n for n in SCORES.names() if SCORES.get(n).needs_negatives} == {"ants", "neglabel"}
    assert [n for n in SCORES.names() if SCORES.get(n).state is not None] == ["ants"]
    assert SCORES.get("mcm").default_temperature == 1.0 and SCORES.get("neglabel").default_temperature == 0.01
    assert SCORES.get("max_logit").inputs == ("id_text_features",)
    assert SCORES.get("neglabel").fn is neglabel_score and SCORES.get("mcm").fn is mcm_score


def test_scorer_dispatch_matches_the_score_functions(tiny_encoder):
    feats = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="neglabel", negatives=_negatives(), num_groups=4,
                   seed=2, cache_dir=False)
    want = neglabel_score(feats, sc.id_features, sc.neg_features, 0.01, 4, 2)
    assert torch.allclose(sc.score_features(feats).scores, want, atol=1e-6)
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="mcm", cache_dir=False)
    assert sc.temperature == 1.0
    assert torch.allclose(sc.score_features(feats).scores, mcm_score(feats, sc.id_features, 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of ants, energy"):
        OODScorer(tiny_encoder, ["apple"], method="nope", cache_dir=False)


def test_toy_score_works_everywhere_without_other_edits(tiny_encoder, scratch_scores):
    @register_score("toy_min_cos")
    def toy_min_cos(image_features, id_text_features):
        """Lowest cosine to an ID class."""
        img = torch.nn.functional.normalize(image_features, dim=-1)
        return (img @ id_text_features.T).min(dim=-1).values

    @register_score(needs_negatives=True)  # name from the function: "toy_neg"
    def toy_neg_score(image_features, neg_text_features, temperature):
        return torch.full((image_features.shape[0],), neg_text_features.shape[0] * temperature)

    assert "toy_min_cos" in SCORES and "toy_neg" in SCORES
    feats = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="toy_min_cos", cache_dir=False)
    assert torch.allclose(sc.score_features(feats).scores, toy_min_cos(feats, sc.id_features))
    assert sc.score_images([Image.new("RGB", (24, 24), (200, 30, 30))]).scores.shape == (1,)

    with pytest.raises(ValueError, match="'toy_neg' needs negative labels"):
        OODScorer(tiny_encoder, ["apple", "leaf"], method="toy_neg", cache_dir=False)
    sc_neg = OODScorer(tiny_encoder, ["apple", "leaf"], method="toy_neg", negatives=_negatives(12), cache_dir=False)
    assert torch.allclose(sc_neg.score_features(feats).scores, torch.full((4,), 12 * 0.01))

    # the CLI accepts it and lists it
    assert "toy_min_cos" in ood_cli.method_names()
    r = CliRunner().invoke(ood_cli.ood_app, ["score", "--help"], env={"COLUMNS": "250"})
    assert "toy_min_cos" in r.output and "toy_neg" in r.output

    # the API serves it
    from clip_ood.api import create_app

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (30, 180, 40)).save(buf, format="PNG")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sc)), base_url="http://t") as c:
            r = await c.post("/v1/score", files=[("files", ("a.png", buf.getvalue(), "image/png"))])
            assert r.status_code == 200, r.text
            return r.json()

    body = asyncio.run(go())
    assert body["method"] == "toy_min_cos" and len(body["results"]) == 1


def test_toy_test_time_state(tiny_encoder, scratch_scores):
    class Counting:
        def __init__(self, inputs):
            self.inputs, self.batches = inputs, 0

        def step(self, feats, images=None):
            self.batches += 1
            return {"score": torch.full((feats.shape[0],), float(self.batches)), "batch": torch.ones(feats.shape[0])}

    @register_score("toy_adaptive", state=lambda encoder, id_labels, inputs: Counting(inputs))
    def toy_adaptive(image_features, id_text_features):
        return torch.zeros(image_features.shape[0])

    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="toy_adaptive", temperature=0.5, cache_dir=False)
    assert isinstance(sc.state, Counting) and isinstance(sc.state.inputs, ScoreInputs)
    assert sc.state.inputs.temperature == 0.5
    feats = torch.randn(3, 32)
    assert sc.score_features(feats).scores.tolist() == [1.0] * 3
    r = sc.score_features(feats)
    assert r.scores.tolist() == [2.0] * 3 and "batch" in r.extra
    assert sc.base_score(feats).tolist() == [0.0] * 3  # the base score never steps the state


def test_registration_checks_inputs(scratch_scores):
    with pytest.raises(TypeError, match="not scorer inputs"):
        @register_score("bad")
        def bad(image_features, text_bank):
            return image_features[:, 0]

    @register_score("ok_default")
    def ok_default(image_features, id_text_features, margin=0.5):  # non-inputs with defaults are fine
        return image_features[:, 0] + margin

    assert SCORES.get("ok_default").inputs == ("id_text_features",)
    with pytest.raises(ValueError, match="already registered"):
        register_score("mcm")(ok_default)


def _registered_in_error(cmd: str, method: str) -> tuple[int, list[str]]:
    r = CliRunner().invoke(ood_cli.ood_app, [cmd, "--method", method, *METHOD_COMMANDS[cmd]])
    m = re.search(r"Registered: (.*)\.", r.output)
    assert m, r.output
    return r.exit_code, m.group(1).split(", ")


@pytest.mark.parametrize("cmd", METHOD_COMMANDS)
def test_cli_method_choices_are_the_registry(cmd, scratch_scores):
    import typer

    commands = typer.main.get_command(ood_cli.ood_app).commands
    assert sorted(c for c in commands if any(p.name == "method" for p in commands[c].params)) == sorted(METHOD_COMMANDS)
    assert ood_cli.method_names() == SCORES.names()
    code, names = _registered_in_error(cmd, "bogus")
    assert code == 2 and names == SCORES.names()
    r = CliRunner().invoke(ood_cli.ood_app, [cmd, "--help"], env={"COLUMNS": "250"})
    assert "OOD score: " + " | ".join(SCORES.names()) in r.output

    register_score("zz_late")(lambda image_features: image_features[:, 0])  # registered after the app was built
    code, names = _registered_in_error(cmd, "bogus")
    assert names == SCORES.names() and "zz_late" in names
    r = CliRunner().invoke(ood_cli.ood_app, [cmd, "--help"], env={"COLUMNS": "250"})
    assert "| zz_late" in r.output
