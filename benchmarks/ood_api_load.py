"""API load test on loopback: requests/s and p50/p99 latency with 1, 8 and 32 concurrent clients, micro-batched
server vs one-request-one-forward (one JSON line).

Starts uvicorn in this process on 127.0.0.1 (a free port), sends a bounded number of one-image multipart requests
per level, then stops the server. Random-weight model (no download); default: the tiny test config (HTTP-bound, for
the smoke test). The README's figure uses ``--model ViT-B-32``: random weights cost the same compute as real ones,
and at ~90 ms an image on 2 CPU cores the encoder dominates, which is where micro-batching matters.

    python benchmarks/ood_api_load.py [--model ViT-B-32] [--requests 64] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), ((i * 37) % 256, (i * 91) % 256, 80)).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """uvicorn on 127.0.0.1 in a background thread; ``stop()`` ends it."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 60:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def _load(port: int, concurrency: int, n_requests: int, payloads: list[bytes]) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as c:
        async def client() -> None:
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                r = await c.post("/v1/score", files=[("files", (f"{i}.png", payloads[i % len(payloads)], "image/png"))])
                lat.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "rps": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * q[49], 2), "p99_ms": round(1000 * q[98], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="open_clip model name or 'tiny'")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=48, help="Requests per concurrency level and mode (bounded).")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-negatives", type=int, default=1000)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    a = p.parse_args()

    import logging

    logging.getLogger().setLevel(logging.ERROR)
    from clip_ood.api import create_app
    from clip_ood.encoders import TINY_CONFIG, load_encoder, register_model_config
    from clip_ood.lexicon import NegativeLabels
    from clip_ood.scorer import OODScorer

    name = register_model_config("negvision-tiny-bench", TINY_CONFIG) if a.model == "tiny" else a.model
    enc = load_encoder(name, device=a.device)
    neg = NegativeLabels([f"negative {i}" for i in range(a.num_negatives)], ["noun"] * a.num_negatives)
    scorer = OODScorer(enc, [f"class {i}" for i in range(a.num_classes)], "neglabel", neg, cache_dir=False)
    levels = [int(c) for c in a.concurrency.split(",")]
    payloads = [_png(i) for i in range(16)]
    results = {}
    for mode, max_batch, wait in (("micro_batched", 64, a.batch_wait_ms), ("one_request_one_forward", 1, 0.0)):
        app = create_app(scorer, max_batch=max_batch, batch_wait_ms=wait)
        with Server(app) as srv:
            asyncio.run(_load(srv.port, 1, 4, payloads))  # warm-up
            results[mode] = [asyncio.run(_load(srv.port, c, a.requests, payloads)) for c in levels]
            b = app.state.batcher
            results[mode + "_mean_images_per_forward"] = round(b.batch_images / max(b.batches, 1), 2)
    speedup = {str(r1["concurrency"]): round(r1["rps"] / r2["rps"], 2)
               for r1, r2 in zip(results["micro_batched"], results["one_request_one_forward"], strict=True)}
    import torch

    print(json.dumps({"benchmark": "ood_api_load", "device": str(enc.device), "model": a.model, "weights": "random",
                      "host": "127.0.0.1", "num_negatives": a.num_negatives, "num_classes": a.num_classes,
                      **results, "rps_speedup_batched_vs_single": speedup,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
