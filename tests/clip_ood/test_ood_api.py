"""The scoring API with httpx: good requests, every bad input, auth, micro-batching of concurrent requests."""

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from clip_ood.api import ApiLimits, create_app
from clip_ood.lexicon import NegativeLabels
from clip_ood.scorer import OODScorer

KEY = "s3cret-key"


def _png(size=(24, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class CountingEncoder:
    """Wraps an encoder and counts encode_image calls and batch sizes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.preprocess, self.cache_key = inner.preprocess, inner.cache_key

    def encode_image(self, images):
        self.calls.append(images.shape[0])
        return self.inner.encode_image(images)

    def encode_text(self, texts):
        return self.inner.encode_text(texts)


@pytest.fixture(scope="module")
def scorer(tiny_encoder, tmp_path_factory):
    neg = NegativeLabels([f"thing{i}" for i in range(40)] + ["shiny"], ["noun"] * 40 + ["adj"])
    return OODScorer(CountingEncoder(tiny_encoder), ["apple", "leaf", "stone"], method="neglabel", negatives=neg,
                     num_groups=4, cache_dir=tmp_path_factory.mktemp("cache"))


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _run(coro):
    return asyncio.run(coro)


def test_score_multipart_and_json_and_labels(scorer):
    app = create_app(scorer, threshold=0.5)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=[("files", ("a.png", _png(), "image/png")),
                                                 ("files", ("b.png", _png(color=(0, 0, 255)), "image/png"))])
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["method"] == "neglabel" and len(body["results"]) == 2
            res = body["results"][0]
            assert res["name"] == "a.png" and 0 <= res["score"] <= 1
            assert res["is_ood"] == (res["score"] < 0.5)
            assert [t["label"] for t in res["top_classes"]][:1][0] in {"apple", "leaf", "stone"}
            assert len(res["top_classes"]) == 3 and abs(sum(t["prob"] for t in res["top_classes"]) - 1) < 1e-4
            assert len(res["nearest_negatives"]) == 5
            b64 = base64.b64encode(_png()).decode()
            r2 = await c.post("/v1/score", json={"images": [b64, {"name": "x", "data": "data:image/png;base64," + b64}]})
            assert r2.status_code == 200, r2.text
            s2 = r2.json()["results"]
            assert s2[0]["score"] == pytest.approx(res["score"], abs=1e-5) and s2[1]["name"] == "x"
            lab = (await c.get("/v1/labels")).json()
            assert lab["id_labels"] == ["apple", "leaf", "stone"] and len(lab["negative_labels"]) == 41
            assert (await c.get("/healthz")).json()["status"] == "ok"
            m = (await c.get("/metrics")).text
            assert 'negvision_ood_requests_total{path="/v1/score",status="200"} 2' in m
            assert "negvision_ood_images_scored_total 4" in m
            assert (await c.post("/v1/reset")).status_code == 409  # neglabel has no test-time state
            docs = (await c.get("/openapi.json")).json()
            assert "/v1/score" in docs["paths"]

    _run(go())


def test_bad_inputs(scorer):
    limits = ApiLimits(max_images=2, max_request_bytes=60_000, max_pixels=100 * 100)
    app = create_app(scorer, limits=limits)
    png = _png()
    big = _png(size=(101, 100))
    truncated = _png(size=(64, 64), color=(1, 2, 3))[:-30]

    async def go():
        async with _client(app) as c:
            async def files(*parts):
                return await c.post("/v1/score", files=[("files", (n, d, "image/png")) for n, d in parts])

            cases = {
                "too many images": (await files(("a", png), ("b", png), ("c", png)), 413),
                "too many pixels": (await files(("big.png", big),), 413),
                "not an image": (await files(("t.txt", b"hello, not an image"),), 415),
                "truncated": (await files(("t.png", truncated),), 400),
                "empty": (await files(("e.png", b""),), 400),
                "too many bytes": (await files(("x.png", b"\x00" * 70_000),), 413),
                "no files": (await c.post("/v1/score", files=[("other", ("a", png, "image/png"))]), 400),
                "json url": (await c.post("/v1/score", json={"images": ["https://example.com/a.png"]}), 400),
                "json path": (await c.post("/v1/score", json={"images": [{"data": "/etc/passwd"}]}), 400),
                "json file url": (await c.post("/v1/score", json={"images": ["file:///etc/hosts"]}), 400),
                "bad base64": (await c.post("/v1/score", json={"images": ["@@@not-base64@@@"]}), 400),
                "bad json": (await c.post("/v1/score", content=b"{oops", headers={"content-type": "application/json"}), 400),
                "json no list": (await c.post("/v1/score", json={"images": []}), 400),
                "json too many": (await c.post("/v1/score", json={"images": ["aGk="] * 3}), 413),
                "wrong content type": (await c.post("/v1/score", content=b"x", headers={"content-type": "text/plain"}), 415),
            }
            for name, (r, want) in cases.items():
                assert r.status_code == want, f"{name}: {r.status_code} {r.text}"
                assert r.json()["detail"], name
            assert "big.png" in cases["too many pixels"][0].json()["detail"]
            assert "t.png" in cases["truncated"][0].json()["detail"]
            assert "URL" in cases["json url"][0].json()["detail"]
            # an EPS payload (would run ghostscript) is refused as not a supported image
            r = await files(("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"))
            assert r.status_code == 415

    _run(go())


def test_auth(scorer):
    app = create_app(scorer, api_key=KEY)

    async def go():
        async with _client(app) as c:
            up = [("files", ("a.png", _png(), "image/png"))]
            assert (await c.post("/v1/score", files=up)).status_code == 401
            r = await c.post("/v1/score", files=up, headers={"X-API-Key": "nope"})
            assert r.status_code == 401 and r.json()["detail"] == "wrong API key"
            assert (await c.post("/v1/score", files=up, headers={"X-API-Key": KEY})).status_code == 200
            assert (await c.post("/v1/score", files=up, headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
            assert (await c.get("/v1/labels", headers={"Authorization": "Bearer bad"})).status_code == 401
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/healthz")).status_code == 200

    _run(go())


def test_concurrent_requests_are_micro_batched(scorer):
    app = create_app(scorer, max_batch=64, batch_wait_ms=300)
    enc = scorer.encoder

    async def go():
        async with _client(app) as c:
            before = len(enc.calls)
            rs = await asyncio.gather(*[
                c.post("/v1/score", files=[("files", (f"{i}.png", _png(color=(i * 40, 0, 0)), "image/png"))])
                for i in range(5)])
            assert all(r.status_code == 200 for r in rs)
            new_calls = enc.calls[before:]
            assert new_calls == [5], new_calls  # five requests, one encoder forward of five images
            # each request got its own image's result back
            single = await c.post("/v1/score", files=[("files", ("3.png", _png(color=(120, 0, 0)), "image/png"))])
            assert single.json()["results"][0]["score"] == pytest.approx(rs[3].json()["results"][0]["score"], abs=1e-5)
            assert app.state.batcher.batch_requests >= 5

    _run(go())


def test_ants_state_over_the_api(tiny_encoder):
    from clip_ood.describers import ScriptedDescriber

    neg = NegativeLabels([f"thing{i}" for i in range(20)], ["noun"] * 20)
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="ants", negatives=neg, num_groups=4, cache_dir=False)
    sc.ants.describer = ScriptedDescriber(sentences=["a photo of a truck"])
    sc.ants.tau = 2.0  # every image counts as a negative image
    app = create_app(sc)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=[("files", ("a.png", _png(), "image/png"))])
            assert r.status_code == 200 and r.json()["method"] == "ants"
            lab = (await c.get("/v1/labels")).json()
            assert lab["ants"]["far_sentences"] == 1
            assert (await c.post("/v1/reset")).json() == {"reset": True}
            assert (await c.get("/v1/labels")).json()["ants"]["far_sentences"] == 0

    _run(go())
