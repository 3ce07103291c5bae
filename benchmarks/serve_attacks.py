"""Hostile clients against `efficientad serve`: lockout by slow and idle sockets, and memory per pixel.

Starts the server on 127.0.0.1 (a subprocess, the CLI's defaults) and measures, in one run:

* **lockout**: --idle idle sockets, --slow sockets that send a request's headers a byte every
  2 s and --slow that send a body that way, held for --hold seconds while a well-behaved client
  asks /health and /predict every 0.5 s: the share of its requests answered 200, and how long the
  attackers' sockets stayed open;
* **over the pending limit**: --max-pending plus 4 uploads at once, every answer a readable HTTP
  status (never a reset);
* **memory**: the server's resident memory (VmRSS, and VmHWM, its peak) after start, after one
  36-megapixel PNG of a few KB scored as JSON, and after 8 such uploads at once with ?heatmap=png;
* **predict**: `efficientad predict` on one 64-megapixel PNG with its overlay, peak RSS of the process
  (measured first, before the server runs).

    python benchmarks/serve_attacks.py --json benchmarks/results/serve_attacks.json

Run with PYTHONPATH pointing at another checkout's src/ to measure that code the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from _server import HOST, Server, tiny_model
from efficientad.deploy.speed import system_info


def flat_png(megapixels: float) -> bytes:
    """A square, flat-grey PNG of about ``megapixels``: a few KB that decode to hundreds of MB."""
    side = int((megapixels * 1e6) ** 0.5)
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def lockout(server: Server, n_idle: int, n_slow: int, hold: float, image: bytes) -> dict:
    """Attack sockets held open while a polite client keeps asking; what it got and how long they lasted."""
    port = server.port
    idle = [socket.create_connection((HOST, port)) for _ in range(n_idle)]
    slow_headers = [socket.create_connection((HOST, port)) for _ in range(n_slow)]
    slow_bodies = [socket.create_connection((HOST, port)) for _ in range(n_slow)]
    for connection in slow_bodies:
        connection.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {10**6}\r\n\r\n".encode())
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    attackers = idle + slow_headers + slow_bodies
    closed_after: dict[socket.socket, float] = {}
    statuses: dict[str, list] = {"health": [], "predict": []}
    started = time.monotonic()
    next_byte = started
    position = 0
    while time.monotonic() - started < hold:
        now = time.monotonic()
        readable, _, _ = select.select([c for c in attackers if c not in closed_after], [], [], 0)
        for connection in readable:  # the server answered or closed: that attacker is done
            with contextlib.suppress(OSError):
                connection.recv(65536)
            closed_after[connection] = now - started
        if now >= next_byte:
            for connection in slow_headers + slow_bodies:
                if connection not in closed_after:
                    with contextlib.suppress(OSError):
                        connection.sendall(request[position % len(request) : position % len(request) + 1] if connection in slow_headers else b"x")
            position += 1
            next_byte = now + 2.0
        for name, call in (("health", lambda: httpx.get(f"{server.url}/health", timeout=5)),
                           ("predict", lambda: httpx.post(f"{server.url}/predict", content=image, timeout=5))):
            try:
                statuses[name].append(call().status_code)
            except httpx.HTTPError as error:
                statuses[name].append(type(error).__name__)
        time.sleep(0.5)
    for connection in attackers:
        connection.close()

    def summary(group: list[socket.socket]) -> dict:
        times = [closed_after[c] for c in group if c in closed_after]
        return {"sockets": len(group), "closed_by_server": len(times), "longest_open_s": round(max(times), 1) if times else None}

    return {
        "hold_seconds": hold,
        "idle": summary(idle),
        "slow_headers": summary(slow_headers),
        "slow_bodies": summary(slow_bodies),
        **{f"{name}_answered_200": f"{codes.count(200)}/{len(codes)}" for name, codes in statuses.items()},
        "other_answers": sorted({str(c) for codes in statuses.values() for c in codes if c != 200}),
    }


async def burst(url: str, payload: bytes, n: int, query: str = "") -> list:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one():
            try:
                return (await client.post(f"{url}/predict{query}", content=payload)).status_code
            except httpx.HTTPError as error:
                return type(error).__name__
        return await asyncio.gather(*(one() for _ in range(n)))


def predict_peak(model: Path, image: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "efficientad", "predict", str(image), "--model", str(model), "--out", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"returncode": result.returncode, "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
            "error": result.stderr.strip().splitlines()[-1] if result.returncode else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=64)
    parser.add_argument("--slow", type=int, default=32)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds the attack sockets are kept open")
    parser.add_argument("--max-pending", type=int, default=64, help="the server's default, to exceed it")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/serve_attacks.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = tiny_model(folder)
        image = small_png()
        big = flat_png(36)
        result: dict = {"machine": system_info()}
        # First, while this script has no other child: RUSAGE_CHILDREN's peak covers every child so far.
        print("predict on 64 MP ...", flush=True)
        huge = folder / "huge.png"
        huge.write_bytes(flat_png(64))
        result["predict_64mp_with_overlay"] = predict_peak(model, huge, folder / "predicted")
        with Server(model, folder / "server.log") as server:
            pid = server.process.pid
            result["memory_mb"] = {"after_start": memory_mb(pid)}
            print("lockout ...", flush=True)
            result["lockout"] = lockout(server, args.idle, args.slow, args.hold, image)
            print("over the pending limit ...", flush=True)
            # Bodies of a few MB, past the socket buffers: a refusal that leaves them unread resets the connection.
            codes = [str(code) for code in asyncio.run(burst(server.url, image * 20, args.max_pending + 4))]
            result["over_pending_limit"] = {"requests": len(codes), "answers": {code: codes.count(code) for code in sorted(set(codes))}}
            print("memory ...", flush=True)
            result["png_36mp_bytes"] = len(big)
            one = asyncio.run(burst(server.url, big, 1))
            result["memory_mb"]["after_one_36mp_json"] = memory_mb(pid) | {"answers": one}
            eight = asyncio.run(burst(server.url, big, 8, "?heatmap=png"))
            result["memory_mb"]["after_eight_36mp_heatmaps_at_once"] = memory_mb(pid) | {"answers": eight}
            result["healthy_at_end"] = server.healthy()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
