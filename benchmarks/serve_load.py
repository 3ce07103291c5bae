"""Load test for `efficientad serve`: a bounded burst of concurrent uploads against a local server.

Starts the server on 127.0.0.1 (a free port, in a subprocess), sends --requests uploads with
--concurrency in flight, a mix of valid images (multipart and raw bodies) and broken ones (empty,
text, truncated, corrupt header), and reports throughput, latency percentiles and error counts.
It checks that every valid upload got the same score as a local ``predict`` on the same image,
that every broken one got its expected 4xx, and that the server is still up and healthy at the end.
Exit code 0 when all of that holds, 1 otherwise.

    python benchmarks/serve_load.py --requests 40 --json /tmp/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from _server import Server, tiny_model

MAX_REQUESTS = 10_000


@dataclass
class Payload:
    name: str
    data: bytes
    expected_status: int
    expected_score: float | None = None


@dataclass
class Outcome:
    payload: Payload
    multipart: bool
    status: int | None
    seconds: float
    score: float | None = None
    server_ms: float | None = None
    error: str | None = None


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_payloads(model: Path, seed: int) -> tuple[list[Payload], list[Payload]]:
    """Valid images of several sizes and formats with their locally predicted scores, and broken uploads."""
    from efficientad.detector import EfficientAD

    rng = np.random.default_rng(seed)
    shapes = [(256, 256), (200, 300), (480, 640), (97, 131)]
    valid = []
    for i, (height, width) in enumerate(shapes):
        array = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        for fmt in ("PNG", "JPEG") if i % 2 == 0 else ("PNG",):
            valid.append(Payload(f"{fmt.lower()}-{width}x{height}", encode(array, fmt), 200))
    detector = EfficientAD.load(model)
    # Decode exactly as the server does (Pillow, then RGB), so JPEG payloads compare like for like.
    for payload, prediction in zip(valid, detector.predict([Image.open(io.BytesIO(p.data)) for p in valid], batch_size=1)):
        payload.expected_score = prediction.score
    png = valid[0].data
    broken = [
        Payload("empty", b"", 400),
        Payload("text", b"definitely not an image\n" * 20, 415),
        Payload("truncated-png", png[: len(png) // 3], 422),
        Payload("corrupt-header-png", png[:16] + b"\x00" * 40 + png[56:], 422),
    ]
    return valid, broken


async def send(client: httpx.AsyncClient, url: str, payload: Payload, multipart: bool) -> Outcome:
    started = time.perf_counter()
    try:
        if multipart:
            response = await client.post(url, files={"file": (f"{payload.name}.img", payload.data, "application/octet-stream")})
        else:
            response = await client.post(url, content=payload.data, headers={"content-type": "application/octet-stream"})
    except httpx.HTTPError as error:
        return Outcome(payload, multipart, None, time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
    outcome = Outcome(payload, multipart, response.status_code, time.perf_counter() - started)
    if response.status_code == 200:
        body = response.json()
        outcome.score, outcome.server_ms = body["score"], body["latency_ms"]
    return outcome


async def run_load(url: str, plan: list[tuple[Payload, bool]], concurrency: int, timeout: float) -> tuple[list[Outcome], float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(payload: Payload, multipart: bool) -> Outcome:
            async with gate:
                return await send(client, f"{url}/predict", payload, multipart)

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(payload, multipart) for payload, multipart in plan))
        return list(outcomes), time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values)
    return {key: round(float(np.percentile(array, q)), 2) for key, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(array.max()), 2)
    }


def summarise(outcomes: list[Outcome], seconds: float, tolerance: float) -> dict:
    valid = [o for o in outcomes if o.payload.expected_status == 200]
    answered = [o for o in valid if o.score is not None]
    differences = [abs(o.score - o.payload.expected_score) for o in answered]
    wrong_status = [o for o in outcomes if o.status is not None and o.status != o.payload.expected_status]
    transport = [o for o in outcomes if o.status is None]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = "no response" if o.status is None else str(o.status)
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "valid_requests": len(valid),
        "broken_requests": len(outcomes) - len(valid),
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(outcomes) / seconds, 2),
        "valid_throughput_rps": round(len(valid) / seconds, 2),
        "latency_ms": percentiles([o.seconds * 1000 for o in outcomes]),
        "valid_latency_ms": percentiles([o.seconds * 1000 for o in valid]),
        "broken_latency_ms": percentiles([o.seconds * 1000 for o in outcomes if o.payload.expected_status != 200]),
        "server_latency_ms": percentiles([o.server_ms for o in answered]),
        "status_counts": dict(sorted(statuses.items())),
        "unexpected_status": len(wrong_status),
        "transport_errors": len(transport),
        "score_mismatches": sum(d > tolerance for d in differences),
        "max_score_difference": max(differences, default=None),
        "examples_of_failures": [
            {"payload": o.payload.name, "multipart": o.multipart, "status": o.status, "expected": o.payload.expected_status, "error": o.error}
            for o in (wrong_status + transport)[:10]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file to serve (default: train a tiny random-teacher one)")
    parser.add_argument("--requests", type=int, default=200, help=f"uploads to send (at most {MAX_REQUESTS})")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight at once")
    parser.add_argument("--broken-fraction", type=float, default=0.25, help="share of uploads that are broken on purpose")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest score difference from a local predict that counts as equal")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0, help="seed for the images and the request mix")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be in 1..{MAX_REQUESTS}")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be in 1..256")
    if not 0.0 <= args.broken_fraction <= 1.0:
        parser.error("--broken-fraction must be in [0, 1]")

    with tempfile.TemporaryDirectory(prefix="efficientad-load-") as scratch:
        scratch = Path(scratch)
        model = args.model or tiny_model(scratch)
        valid, broken = make_payloads(model, args.seed)
        rng = np.random.default_rng(args.seed)
        plan = []
        for i in range(args.requests):
            pool = broken if rng.random() < args.broken_fraction else valid
            plan.append((pool[rng.integers(len(pool))], i % 2 == 0))

        with Server(model, scratch / "server.log") as server:
            print(f"server up at {server.url}; sending {args.requests} uploads, {args.concurrency} at a time", flush=True)
            outcomes, seconds = asyncio.run(run_load(server.url, plan, args.concurrency, args.timeout))
            alive, healthy = server.alive(), server.healthy()
            log_tail = server.log_tail()

    report = {
        "model": str(args.model) if args.model else "tiny random-teacher model (trained here)",
        "concurrency": args.concurrency,
        **summarise(outcomes, seconds, args.tolerance),
        "server_alive_after": alive,
        "server_healthy_after": healthy,
    }
    report["ok"] = bool(
        alive and healthy and not report["unexpected_status"] and not report["transport_errors"] and not report["score_mismatches"]
    )
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        print(f"FAILED; server log tail:\n{log_tail}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
