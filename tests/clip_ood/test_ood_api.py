"""The scoring API with httpx: good requests, every bad input, auth and keys, micro-batching, metrics that cannot be
injected into, decoding off the event loop, limits, back-pressure, timeouts, model errors and readiness."""

import asyncio
import base64
import io
import logging
import threading

import httpx
import pytest
from PIL import Image

from clip_ood.api import ApiKeys, ApiLimits, ServeLimits, create_app, is_loopback
from clip_ood.lexicon import NegativeLabels
from clip_ood.scorer import OODScorer

KEY = "s3cret-key"


def _png(size=(24, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class CountingEncoder:
    """Wraps an encoder and counts encode_image calls and batch sizes; ``gate`` (an Event) holds each call until
    set, ``fail`` makes calls raise."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.preprocess, self.cache_key = inner.preprocess, inner.cache_key
        self.gate: threading.Event | None = None
        self.fail = False

    def encode_image(self, images):
        if self.gate is not None:
            assert self.gate.wait(20), "test gate never opened"
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.calls.append(images.shape[0])
        return self.inner.encode_image(images)

    def encode_text(self, texts):
        return self.inner.encode_text(texts)


NEG = NegativeLabels([f"thing{i}" for i in range(40)] + ["shiny"], ["noun"] * 40 + ["adj"])


@pytest.fixture(scope="module")
def scorer(tiny_encoder, tmp_path_factory):
    return OODScorer(CountingEncoder(tiny_encoder), ["apple", "leaf", "stone"], method="neglabel", negatives=NEG,
                     num_groups=4, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def own_scorer(tiny_encoder):
    """A scorer whose encoder the test may block or break."""
    return OODScorer(CountingEncoder(tiny_encoder), ["apple", "leaf", "stone"], method="neglabel", negatives=NEG,
                     num_groups=4, cache_dir=False)


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _run(coro):
    return asyncio.run(coro)


def _one(name="a.png", **kw):
    return [("files", (name, _png(**kw), "image/png"))]


def _samples(text: str) -> dict:
    """Prometheus text -> {(name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_score_multipart_and_json_and_labels(scorer):
    app = create_app(scorer, threshold=0.5)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=[("files", ("a.png", _png(), "image/png")),
                                                 ("files", ("b.png", _png(color=(0, 0, 255)), "image/png"))])
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["method"] == "neglabel" and len(body["results"]) == 2
            assert body["threshold"] == 0.5 and body["threshold_source"] == "fixed"
            assert body["request_id"] == r.headers["x-request-id"]
            res = body["results"][0]
            assert res["name"] == "a.png" and 0 <= res["score"] <= 1
            assert (res["index"], res["field"], res["filename"]) == (0, "files", "a.png")
            assert res["is_ood"] == (res["score"] < 0.5)
            assert [t["label"] for t in res["top_classes"]][:1][0] in {"apple", "leaf", "stone"}
            assert len(res["top_classes"]) == 3 and abs(sum(t["prob"] for t in res["top_classes"]) - 1) < 1e-4
            assert len(res["nearest_negatives"]) == 5
            b64 = base64.b64encode(_png()).decode()
            r2 = await c.post("/v1/score", json={"images": [b64, {"name": "x", "data": "data:image/png;base64," + b64}]})
            assert r2.status_code == 200, r2.text
            s2 = r2.json()["results"]
            assert s2[0]["score"] == pytest.approx(res["score"], abs=1e-6)
            assert (s2[0]["index"], s2[0]["field"], s2[0]["filename"], s2[0]["name"]) == (0, "images", None, "images[0]")
            assert (s2[1]["index"], s2[1]["filename"]) == (1, "x")
            lab = (await c.get("/v1/labels")).json()
            assert lab["id_labels"] == ["apple", "leaf", "stone"] and len(lab["negative_labels"]) == 41
            assert lab["settings"]["id_templates"] == ["The nice {}."] and lab["settings"]["temperature"] == 0.01
            assert (await c.get("/healthz")).json()["status"] == "ok"
            assert (await c.get("/readyz")).json()["status"] == "ready"
            m = await c.get("/metrics")
            assert m.headers["content-type"].startswith("text/plain")
            got = _samples(m.text)
            assert got[("negvision_ood_requests_total",
                        frozenset({"route": "/v1/score", "method": "POST", "status": "2xx"}.items()))] == 2
            assert got[("negvision_ood_images_scored_total", frozenset())] == 4
            assert got[("negvision_ood_batch_images_count", frozenset())] == 2
            assert got[("negvision_ood_request_seconds_count",
                        frozenset({"route": "/v1/score", "method": "POST"}.items()))] == 2
            assert ("negvision_ood_queue_images", frozenset()) in got
            r = await c.post("/v1/reset")
            assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"  # neglabel has no test-time state
            docs = (await c.get("/openapi.json")).json()
            assert "/v1/score" in docs["paths"]

    _run(go())


def test_uploads_with_one_name_come_back_by_index(scorer):
    app = create_app(scorer)

    async def go():
        async with _client(app) as c:
            colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
            r = await c.post("/v1/score", files=[("files", ("0000.png", _png(color=k), "image/png")) for k in colors])
            res = r.json()["results"]
            assert [(x["index"], x["filename"]) for x in res] == [(0, "0000.png"), (1, "0000.png"), (2, "0000.png")]
            for x, k in zip(res, colors, strict=True):  # each result is its own upload's
                one = (await c.post("/v1/score", files=_one("0000.png", color=k))).json()["results"][0]
                assert one["score"] == pytest.approx(x["score"], abs=1e-6)
            body = r.json()
            assert body["threshold"] == "uncalibrated" and body["threshold_source"] is None
            assert all(x["is_ood"] is None for x in res)  # no threshold, no decision

    _run(go())


def test_api_scores_equal_the_batch_scores_and_exif_is_applied(scorer):
    """score_pixels (the API path: preprocess in the decode thread) equals score_images (the batch path), and an
    upload with an EXIF rotation is scored as displayed."""
    rng = __import__("numpy").random.default_rng(0)
    arr = rng.integers(0, 255, (20, 36, 3)).astype("uint8")
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(buf, format="PNG", exif=exif)
    shown = im.transpose(Image.Transpose.ROTATE_270)
    want = float(scorer.score_images([shown]).scores[0])
    unrotated = float(scorer.score_images([im]).scores[0])
    assert abs(want - unrotated) > 1e-6  # the test can tell them apart
    app = create_app(scorer)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=[("files", ("phone.png", buf.getvalue(), "image/png"))])
            assert r.json()["results"][0]["score"] == pytest.approx(want, abs=1e-6)

    _run(go())


def test_bad_inputs(scorer):
    limits = ApiLimits(max_images=2, max_request_bytes=60_000, max_pixels=100 * 100, max_request_pixels=70 * 70)
    app = create_app(scorer, limits=limits)
    png = _png()
    big = _png(size=(101, 100))
    half = _png(size=(50, 50))
    truncated = _png(size=(64, 64), color=(1, 2, 3))[:-30]

    async def go():
        async with _client(app) as c:
            async def files(*parts):
                return await c.post("/v1/score", files=[("files", (n, d, "image/png")) for n, d in parts])

            cases = {
                "too many images": (await files(("a", png), ("b", png), ("c", png)), 413),
                "too many pixels": (await files(("big.png", big),), 413),
                "request pixels": (await files(("h1.png", half), ("h2.png", half)), 413),
                "not an image": (await files(("t.txt", b"hello, not an image"),), 415),
                "truncated": (await files(("t.png", truncated),), 400),
                "empty": (await files(("e.png", b""),), 400),
                "too many bytes": (await files(("x.png", b"\x00" * 70_000),), 413),
                "no files": (await c.post("/v1/score", files=[("other", ("a", png, "image/png"))]), 400),
                "text part": (await c.post("/v1/score", data={"files": "hello"}, files=[("x", ("a", png))]), 400),
                "bad multipart": (await c.post("/v1/score", content=b"--zz\r\ngarbage",
                                               headers={"content-type": "multipart/form-data; boundary=zz"}), 400),
                "json url": (await c.post("/v1/score", json={"images": ["https://example.com/a.png"]}), 400),
                "json path": (await c.post("/v1/score", json={"images": [{"data": "/etc/passwd"}]}), 400),
                "json file url": (await c.post("/v1/score", json={"images": ["file:///etc/hosts"]}), 400),
                "bad base64": (await c.post("/v1/score", json={"images": ["@@@not-base64@@@"]}), 400),
                "bad json": (await c.post("/v1/score", content=b"{oops", headers={"content-type": "application/json"}), 400),
                "json no list": (await c.post("/v1/score", json={"images": []}), 400),
                "json too many": (await c.post("/v1/score", json={"images": ["aGk="] * 3}), 413),
                "wrong content type": (await c.post("/v1/score", content=b"x", headers={"content-type": "text/plain"}), 415),
                "no such route": (await c.get("/v2/nothing"), 404),
                "wrong method": (await c.get("/v1/score"), 405),
            }
            for name, (r, want) in cases.items():
                assert r.status_code == want, f"{name}: {r.status_code} {r.text}"
                err = r.json()["error"]
                assert err["message"] and err["code"] and err["request_id"] == r.headers["x-request-id"], name
            assert "big.png" in cases["too many pixels"][0].json()["error"]["message"]
            e = cases["request pixels"][0].json()["error"]
            assert e["limit"] == 4900 and e["limit_name"] == "max_request_pixels" and "5000 pixels" in e["message"]
            assert cases["too many images"][0].json()["error"]["limit"] == 2
            assert "t.png" in cases["truncated"][0].json()["error"]["message"]
            assert "URL" in cases["json url"][0].json()["error"]["message"]
            assert cases["too many bytes"][0].json()["error"]["code"] == "payload_too_large"
            # an EPS payload (would run ghostscript) is refused as not a supported image
            r = await files(("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"))
            assert r.status_code == 415
            # a client's own request id is echoed when it is sane, replaced when it is not
            r = await files(("a.png", png))
            assert r.status_code == 200
            r = await c.get("/healthz", headers={"X-Request-ID": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            r = await c.get("/healthz", headers={"X-Request-ID": "bad id\twith tab"})
            assert r.headers["x-request-id"] != "bad id\twith tab" and len(r.headers["x-request-id"]) == 32

    _run(go())


def test_metrics_cannot_be_injected_and_stay_bounded(scorer):
    """The raw path never becomes a label: a crafted 404 path cannot write lines into /metrics, and random paths
    add no series."""
    app = create_app(scorer)
    evil = "/x%22%7D%201%0Anegvision_evil_total%201%0A%23%20"  # /x"} 1\nnegvision_evil_total 1\n#

    async def go():
        async with _client(app) as c:
            r = await c.get(evil)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            await c.post("/v1/score/../first")
            await c.get("/metrics")
            before = (await c.get("/metrics")).text
            for i in range(30):
                await c.get(f"/random/{i}/path")
                await c.post(f"/v1/score/../{i}")
            text = (await c.get("/metrics")).text
            assert "negvision_evil" not in text and "random" not in text
            got = _samples(text)
            routes = {dict(k[1]).get("route") for k in got if k[0] == "negvision_ood_requests_total"}
            assert routes <= {"unmatched", "/metrics", "/v1/score"}
            assert len(text.splitlines()) == len(before.splitlines())  # 60 new paths, no new series
            n = got[("negvision_ood_requests_total",
                     frozenset({"route": "unmatched", "method": "GET", "status": "4xx"}.items()))]
            assert n == 31

    _run(go())


def test_healthz_answers_while_images_decode(own_scorer):
    """Decoding and preprocessing run in the decode threads: with one request stuck in preprocessing, /healthz and
    /readyz still answer (on the event loop they would wait for it)."""
    gate, entered = threading.Event(), threading.Event()
    inner = own_scorer.encoder.preprocess

    def slow_preprocess(im):
        entered.set()
        assert gate.wait(20)
        return inner(im)

    own_scorer.encoder.preprocess = slow_preprocess
    app = create_app(own_scorer)

    async def go():
        async with _client(app) as c:
            task = asyncio.create_task(c.post("/v1/score", files=_one()))
            for _ in range(200):
                if entered.is_set():
                    break
                await asyncio.sleep(0.01)
            assert entered.is_set()
            h = await asyncio.wait_for(c.get("/healthz"), 5)
            assert h.status_code == 200 and not task.done()
            assert (await asyncio.wait_for(c.get("/readyz"), 5)).status_code == 200
            gate.set()
            assert (await task).status_code == 200

    _run(go())


def test_full_queue_is_503_with_retry_after(own_scorer):
    enc = own_scorer.encoder
    enc.gate = threading.Event()
    app = create_app(own_scorer, serve=ServeLimits(max_queue=2, timeout_s=20), batch_wait_ms=0)
    b = app.state.batcher

    async def go():
        async with _client(app) as c:
            running = asyncio.create_task(c.post("/v1/score", files=_one()))  # taken by the worker, held in the model
            for _ in range(500):
                if b.health.busy_since is not None:
                    break
                await asyncio.sleep(0.01)
            queued = [asyncio.create_task(c.post("/v1/score", files=_one(f"{i}.png"))) for i in range(2)]
            for _ in range(500):
                if b.pending == 2:
                    break
                await asyncio.sleep(0.01)
            assert b.pending == 2
            r = await c.post("/v1/score", files=_one("late.png"))
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            m = _samples((await c.get("/metrics")).text)
            assert m[("negvision_ood_queue_images", frozenset())] == 2
            enc.gate.set()
            assert [(await t).status_code for t in [running, *queued]] == [200, 200, 200]
            assert (await c.post("/v1/score", files=_one())).status_code == 200

    _run(go())


def test_timeout_is_504_and_a_timed_out_request_is_not_computed(own_scorer):
    enc = own_scorer.encoder
    enc.gate = threading.Event()
    app = create_app(own_scorer, serve=ServeLimits(timeout_s=0.5), batch_wait_ms=0)

    async def go():
        async with _client(app) as c:
            first = asyncio.create_task(c.post("/v1/score", files=_one("a.png")))  # held in the model
            await asyncio.sleep(0.1)
            second = await c.post("/v1/score", files=_one("b.png"))  # waits in the queue, times out there
            r = await first
            assert r.status_code == 504 and second.status_code == 504
            err = r.json()["error"]
            assert err["code"] == "timeout" and err["limit"] == 0.5
            enc.gate.set()
            for _ in range(200):
                if app.state.batcher.health.busy_since is None and enc.calls:
                    break
                await asyncio.sleep(0.01)
            assert enc.calls == [1]  # the first ran to its end; the second was dropped before the model
            assert (await c.post("/v1/score", files=_one())).status_code == 200

    _run(go())


def test_model_error_is_a_json_500_and_flips_readyz(own_scorer, caplog):
    enc = own_scorer.encoder
    enc.fail = True
    app = create_app(own_scorer, serve=ServeLimits(max_failures=2))

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=_one(), headers={"X-Request-ID": "req-1"})
            assert r.status_code == 500 and r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["code"] == "model_error" and err["request_id"] == "req-1" and "req-1" in err["message"]
            assert "illegal memory" not in err["message"]  # internals stay in the log
            assert (await c.get("/readyz")).status_code == 200  # one failure
            assert (await c.post("/v1/score", files=_one())).status_code == 500
            rz = await c.get("/readyz")
            assert rz.status_code == 503 and rz.json()["error"]["consecutive_failures"] == 2
            assert (await c.get("/healthz")).status_code == 200  # alive, not ready
            enc.fail = False
            assert (await c.post("/v1/score", files=_one())).status_code == 200
            assert (await c.get("/readyz")).status_code == 200
            m = _samples((await c.get("/metrics")).text)
            assert m[("negvision_ood_model_errors_total", frozenset())] == 2
            assert m[("negvision_ood_requests_total",
                      frozenset({"route": "/v1/score", "method": "POST", "status": "5xx"}.items()))] == 2

    with caplog.at_level(logging.ERROR, logger="negvision.api"):
        _run(go())
    logged = [r for r in caplog.records if "req-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log


def test_an_unexpected_error_is_a_json_500(own_scorer):
    app = create_app(own_scorer)

    def boom():
        raise KeyError("internal")

    app.state.scorer.describe = lambda *a, **k: boom()

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=_one())
            assert r.status_code == 500 and r.json()["error"]["code"] in ("internal_error", "model_error")

    _run(go())


def test_auth_several_keys_env_and_a_rotating_key_file(scorer, tmp_path, monkeypatch):
    kf = tmp_path / "keys.txt"
    kf.write_text("# rotation: old and new\nold-key\nnew-key\n")
    monkeypatch.setenv("NEGVISION_API_KEY", "env-a, env-b")
    keys = ApiKeys([KEY], kf, recheck_s=0.0)
    app = create_app(scorer, api_key=keys)

    async def go():
        async with _client(app) as c:
            up = _one()
            r = await c.post("/v1/score", files=up)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "unauthorized"
            r = await c.post("/v1/score", files=up, headers={"X-API-Key": "nope"})
            assert r.status_code == 401 and r.json()["error"]["message"] == "wrong API key"
            for k in (KEY, "old-key", "new-key", "env-a", "env-b"):
                assert (await c.post("/v1/score", files=up, headers={"X-API-Key": k})).status_code == 200, k
            assert (await c.post("/v1/score", files=up, headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
            assert (await c.get("/v1/labels", headers={"Authorization": "Bearer bad"})).status_code == 401
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/healthz")).status_code == 200 and (await c.get("/readyz")).status_code == 200
            kf.write_text("new-key\nnewer-key-2\n")  # rotate: old-key dropped, no restart
            import os

            st = kf.stat()
            os.utime(kf, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
            assert (await c.post("/v1/score", files=up, headers={"X-API-Key": "old-key"})).status_code == 401
            assert (await c.post("/v1/score", files=up, headers={"X-API-Key": "newer-key-2"})).status_code == 200
            kf.unlink()  # a file being replaced: the last good keys stay
            assert (await c.post("/v1/score", files=up, headers={"X-API-Key": "new-key"})).status_code == 200

    _run(go())
    with pytest.raises(ValueError, match="missing.txt"):
        ApiKeys([], tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no key"):
        ApiKeys([], tmp_path / "empty.txt")
    monkeypatch.delenv("NEGVISION_API_KEY")
    assert not ApiKeys([]).enabled


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("::")
    assert not is_loopback("example.com")


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
            m = _samples((await c.get("/metrics")).text)
            bucket = {le: m[("negvision_ood_batch_images_bucket", frozenset({"le": le}.items()))]
                      for le in ("1.0", "4.0", "8.0")}
            assert bucket == {"1.0": 1, "4.0": 1, "8.0": 2}  # the single request, then the batch of five

    _run(go())


def test_ants_state_over_the_api(tiny_encoder):
    from clip_ood.describers import ScriptedDescriber

    neg = NegativeLabels([f"thing{i}" for i in range(20)], ["noun"] * 20)
    sc = OODScorer(tiny_encoder, ["apple", "leaf"], method="ants", negatives=neg, num_groups=4, cache_dir=False)
    sc.state.describer = ScriptedDescriber(sentences=["a photo of a truck"])
    sc.state.tau = 2.0  # every image counts as a negative image
    app = create_app(sc)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/score", files=[("files", ("a.png", _png(), "image/png"))])
            assert r.status_code == 200 and r.json()["method"] == "ants"
            lab = (await c.get("/v1/labels")).json()
            assert lab["ants"]["far_sentences"] == 1 and lab["ants"]["scope"] == "this worker process"
            assert (await c.post("/v1/reset")).json()["reset"] is True
            assert (await c.get("/v1/labels")).json()["ants"]["far_sentences"] == 0

    _run(go())
