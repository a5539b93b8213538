"""API soak test: many concurrent clients on loopback for a fixed time against a real ``negvision ood serve``
process, a mix of valid, oversize, non-image and truncated uploads (one JSON line; stops by itself).

Reports requests/s, p50 / p99 latency of the valid uploads, the status counts (5xx must be 0), the server's peak
resident memory against its idle figure (must stay within 1.5x) and /healthz p99 during the run. The server runs
the tiny random CLIP of the tests (saved as a local-dir model): HTTP, parsing and decoding dominate, which is what
a soak test stresses.

    python benchmarks/ood_api_soak.py [--clients 64] [--duration 60] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(size, fmt: str, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3)).astype("uint8")
    im = Image.fromarray(a).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _flat_png(size) -> bytes:
    """A large, highly compressible PNG (a decompression-bomb shape: small upload, many pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_payloads() -> dict[str, list[list[tuple[str, bytes, str]]]]:
    """Kinds of request -> list of requests (each a list of (filename, bytes, mime))."""
    valid = []
    for i in range(12):
        n = 1 + i % 3
        parts = []
        for j in range(n):
            if (i + j) % 2:
                parts.append((f"{i}_{j}.jpg", _image((640, 480), "JPEG", 10 * i + j), "image/jpeg"))
            else:
                parts.append((f"{i}_{j}.png", _image((256, 256), "PNG", 10 * i + j), "image/png"))
        valid.append(parts)
    big = _flat_png((7000, 7000))  # 49 MP > the 40 MP per-image limit
    mid = _flat_png((3000, 3000))  # 9 MP each; 8 of them = 72 MP > the 64 MP per-request limit
    jpg = _image((640, 480), "JPEG", 999)
    return {
        "valid": valid,
        "oversize_image": [[("bomb.png", big, "image/png")]],
        "oversize_request": [[(f"m{i}.png", mid, "image/png") for i in range(8)]],
        "not_image": [[("notes.jpg", b"this is a text file, saved as .jpg\n" * 20, "image/jpeg")]],
        "truncated": [[("cut.jpg", jpg[: len(jpg) // 2], "image/jpeg")]],
    }


MIX = {"valid": 0.6, "oversize_image": 0.1, "oversize_request": 0.1, "not_image": 0.1, "truncated": 0.1}


def make_model_dir(root: Path) -> tuple[str, Path, Path]:
    """The tiny random CLIP as a local-dir model, a class list and a negatives file."""
    import torch
    from safetensors.torch import save_file

    from clip_ood.encoders import TINY_CONFIG, load_encoder, register_model_config

    register_model_config("negvision-tiny-soak", TINY_CONFIG)
    enc = load_encoder("negvision-tiny-soak", device="cpu", seed=0)
    d = root / "tiny_clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    del enc, torch
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(100)))
    (root / "neg.txt").write_text("".join(f"noun\tnegative {i}\n" for i in range(1000)))
    return f"local-dir:{d}", root / "classes.txt", root / "neg.txt"


class RssSampler:
    """Samples the resident memory of a process and its children every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every, self.peak, self.samples = every, 0, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


async def soak(base: str, key: str, clients: int, duration: float, payloads: dict, seed: int) -> dict:
    import httpx

    status: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lat: list[float] = []
    health: list[float] = []
    errors: collections.Counter = collections.Counter()
    kinds, weights = list(MIX), list(MIX.values())
    stop_at = time.perf_counter() + duration
    # idle connections expire on the client before the server (uvicorn: 5 s) closes them: no keep-alive race
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits, headers={"X-API-Key": key}) as c:
        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                parts = rng.choice(payloads[kind])
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/score", files=[("files", p) for p in parts])
                    code = r.status_code
                except httpx.HTTPError as e:  # a transport error (no HTTP answer), by kind of upload
                    errors[f"{kind}: {type(e).__name__}: {e}"[:160]] += 1
                    continue
                dt = time.perf_counter() - t0
                status[code] += 1
                by_kind[kind][code] += 1
                if kind == "valid" and code == 200:
                    lat.append(dt)

        async def prober() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=30) as h:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    r = await h.get("/healthz")
                    if r.status_code == 200:
                        health.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.05)

        t0 = time.perf_counter()
        await asyncio.gather(prober(), *[client(i) for i in range(clients)])
        wall = time.perf_counter() - t0
    n = sum(status.values())
    return {"requests": n, "wall_s": round(wall, 1), "rps": round(n / wall, 1),
            "valid_p50_ms": round(1000 * _quantile(lat, 0.5), 1), "valid_p99_ms": round(1000 * _quantile(lat, 0.99), 1),
            "status": {str(k): v for k, v in sorted(status.items())},
            "status_by_kind": {k: {str(s): v for s, v in sorted(c.items())} for k, c in by_kind.items()},
            "n_5xx": sum(v for k, v in status.items() if k >= 500), "client_errors": dict(errors),
            "healthz_p50_ms": round(1000 * _quantile(health, 0.5), 1),
            "healthz_p99_ms": round(1000 * _quantile(health, 0.99), 1), "healthz_probes": len(health)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of load (the script stops by itself).")
    p.add_argument("--workers", type=int, default=1, help="Server worker processes.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import httpx

    with tempfile.TemporaryDirectory(prefix="negvision-soak-") as tmp:
        root = Path(tmp)
        model, classes, neg = make_model_dir(root)
        key = "soak-key"
        (root / "keys.txt").write_text(key + "\n")
        port = _free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "vision.cli", "-q", "ood", "serve", "--model", model, "--id-labels", str(classes),
               "--neg-labels", str(neg), "--method", "neglabel", "--port", str(port), "--workers", str(a.workers),
               "--api-key-file", str(root / "keys.txt"), "--device", "cpu"]
        log = open(root / "server.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    raise SystemExit("server exited:\n" + (root / "server.log").read_text()[-3000:])
                try:
                    if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() - t0 > 300:
                    raise SystemExit("server not ready after 300 s")
                time.sleep(0.3)
            startup_s = time.time() - t0
            payloads = make_payloads()
            sampler = RssSampler(proc.pid)
            for parts in payloads["valid"]:  # warm-up: every code path once, then the idle figure
                httpx.post(base + "/v1/score", files=[("files", x) for x in parts], headers={"X-API-Key": key},
                           timeout=60)
            time.sleep(1.0)
            idle = sampler.rss()
            with sampler:
                res = asyncio.run(soak(base, key, a.clients, a.duration, payloads, a.seed))
            after = sampler.rss()
            ready = httpx.get(base + "/readyz", timeout=10).status_code
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    import torch

    print(json.dumps({"benchmark": "ood_api_soak", "clients": a.clients, "duration_s": a.duration,
                      "workers": a.workers, "model": "tiny random CLIP (tests' config), neglabel, 100 classes, "
                      "1,000 negatives", "mix": MIX, "startup_s": round(startup_s, 1), **res,
                      "rss_idle_mb": round(idle / 2**20, 1), "rss_peak_mb": round(sampler.peak / 2**20, 1),
                      "rss_after_mb": round(after / 2**20, 1), "rss_peak_over_idle": round(sampler.peak / idle, 3),
                      "readyz_after": ready, "pass_no_5xx": res["n_5xx"] == 0,
                      "pass_rss_within_1_5x": sampler.peak <= 1.5 * idle, "cpu_count": os.cpu_count(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
