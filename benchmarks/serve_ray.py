"""`efficientad serve --ray` and `serve --models` under load: requests/s, latency, and the cost of loading models.

    python benchmarks/serve_ray.py --json benchmarks/results/serve_ray.json

In one run (about 6 minutes on 2 cores), with a tiny random-teacher model (the full PDN-S compute
of a real one) and --concurrency clients sending a 256x256 PNG as fast as they are answered:

* **one model**: the single-process server (`serve --model`) and Ray Serve with 1 and 2 replicas
  of 1 CPU each: requests/s and p50/p99 latency over --seconds;
* **many models**: --models copies of the model behind /models/NAME/predict, on the
  single-process server (`serve --models`) and on Ray Serve (2 replicas, model multiplexing, the
  `serve_multiplexed_model_id` header set so that Ray routes a name to a replica that has it):
  each model's first request (cold: load, warm-up, inference) against its second (warm), then
  names drawn at random for --seconds, with every model fitting in memory (--max-loaded
  --models) and with the default --max-loaded 8 (models evicted and loaded again).

Ray runs in this process (a local Ray of --ray-cpus CPUs); the app is deployed by the same
function `serve --ray` calls. The single-process server runs as `efficientad serve` in a
subprocess. Every answer must be 200 with the same score (the models are copies), else exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from _server import Server, demo_texture, free_port, tiny_model
from efficientad.deploy.speed import system_info

Route = Callable[[random.Random], tuple[str, dict[str, str]]]


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values)
    return {"p50": round(float(np.percentile(array, 50)), 1), "p99": round(float(np.percentile(array, 99)), 1), "max": round(float(array.max()), 1)}


class Tally:
    """Statuses and scores of every answer, to check that the load got right answers, not only fast ones."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.scores: list[float] = []

    def add(self, response: httpx.Response | None, error: str | None = None) -> None:
        self.statuses[error or str(response.status_code)] += 1
        if response is not None and response.status_code == 200:
            self.scores.append(response.json()["score"])

    def ok(self) -> bool:
        return set(self.statuses) == {"200"} and (max(self.scores) - min(self.scores)) <= 1e-5 * abs(max(self.scores))


async def steady(url: str, route: Route, image: bytes, concurrency: int, seconds: float, seed: int, tally: Tally, at_least: int = 0) -> dict:
    """``concurrency`` clients posting ``image`` to ``route``'s paths back to back for ``seconds`` (and ``at_least`` times each)."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def client_loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            sent = 0
            while sent < at_least or time.perf_counter() < stop_at:
                sent += 1
                path, headers = route(rng)
                started = time.perf_counter()
                try:
                    response = await client.post(url + path, content=image, headers=headers)
                except httpx.HTTPError as error:
                    tally.add(None, type(error).__name__)
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                tally.add(response)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"answers": len(latencies), "seconds": round(elapsed, 1), "requests_per_s": round(len(latencies) / elapsed, 2),
            "latency_ms": percentiles(latencies)}


def cold_and_warm(url: str, names: list[str], image: bytes, headers: Callable[[str], dict[str, str]], tally: Tally) -> dict:
    """Each model's first request (load + warm-up + inference) and then its second, one request at a time."""
    cold, warm = [], []
    with httpx.Client(timeout=300) as client:
        for name in names:
            for times in (cold, warm):
                started = time.perf_counter()
                response = client.post(f"{url}/models/{name}/predict", content=image, headers=headers(name))
                times.append((time.perf_counter() - started) * 1000)
                tally.add(response)
    return {"first_request_ms": percentiles(cold), "second_request_ms": percentiles(warm),
            "load_cost_ms_median": round(float(np.median(cold) - np.median(warm)), 1)}


def one_model(path: str) -> Route:
    return lambda rng: (path, {})


def random_models(names: list[str], affinity: bool) -> Route:
    def route(rng: random.Random) -> tuple[str, dict[str, str]]:
        name = rng.choice(names)
        return f"/models/{name}/predict", ({"serve_multiplexed_model_id": name} if affinity else {})

    return route


def warm_up(url: str, route: Route, image: bytes, concurrency: int, tally: Tally) -> None:
    """One request per client at once, unmeasured: every replica has run its model before the clock starts."""
    asyncio.run(steady(url, route, image, concurrency, 0.0, 99, tally, at_least=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each timed load")
    parser.add_argument("--models", type=int, default=20, help="copies of the model served by name")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/serve_ray.json"))
    args = parser.parse_args()
    import ray
    from ray import serve as ray_serve

    from efficientad.serve_ray import APP_NAME, Scaling, deploy

    started = time.monotonic()
    tally = Tally()
    image = _png(demo_texture(np.random.default_rng(1)))
    limits = {"show_details": False, "max_upload_mb": 20.0, "max_megapixels": 40.0, "max_pending": 64, "body_timeout": 30.0}
    result: dict = {"machine": system_info(), "concurrency": args.concurrency, "seconds_per_load": args.seconds, "models": args.models}
    with tempfile.TemporaryDirectory(prefix="efficientad-serve-ray-") as scratch:
        scratch = Path(scratch)
        model = tiny_model(scratch)
        folder = scratch / "models"
        names = [f"m{i:02d}" for i in range(args.models)]
        for name in names:
            (folder / name).mkdir(parents=True)
            shutil.copy(model, folder / name / "model.pt")

        print("one process, --model ...", flush=True)
        with Server(model, scratch / "one.log") as server:
            warm_up(server.url, one_model("/predict"), image, args.concurrency, tally)
            result["one_model"] = {"one_process": asyncio.run(steady(server.url, one_model("/predict"), image, args.concurrency, args.seconds, 1, tally))}
        print("one process, --models ...", flush=True)
        many: dict = {}
        with Server(folder, scratch / "many.log", ["--max-loaded", str(args.models)], target="--models") as server:
            many["cold_and_warm"] = cold_and_warm(server.url, names, image, lambda name: {}, tally)
            many["random_names_all_loaded"] = asyncio.run(steady(server.url, random_models(names, False), image, args.concurrency, args.seconds, 2, tally))
        with Server(folder, scratch / "many8.log", ["--max-loaded", "8"], target="--models") as server:
            many["random_names_max_loaded_8"] = asyncio.run(steady(server.url, random_models(names, False), image, args.concurrency, args.seconds, 3, tally))
        result["many_models"] = {"one_process": many}

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Ray's own pydantic models, on import
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def on_ray(target: Path, many_models: bool, replicas: int, max_loaded: int = 8) -> None:
            deploy(target, many=many_models, options=limits if many_models else {**limits, "device": "cpu", "precision": None, "threshold": None},
                   folder_options={"max_loaded": max_loaded, "device": "cpu", "precision": None},
                   scaling=Scaling(replicas=replicas), port=port, keep_alive_timeout=5.0, request_timeout=120.0)

        try:
            for replicas in (1, 2):
                print(f"Ray Serve, --model, {replicas} replica(s) ...", flush=True)
                on_ray(model, False, replicas)
                warm_up(url, one_model("/predict"), image, args.concurrency, tally)
                result["one_model"][f"ray_{replicas}_replicas"] = asyncio.run(steady(url, one_model("/predict"), image, args.concurrency, args.seconds, 4, tally))
                ray_serve.delete(APP_NAME)
            print("Ray Serve, --models, 2 replicas ...", flush=True)
            many = {}
            on_ray(folder, True, 2, max_loaded=args.models)
            by_header = lambda name: {"serve_multiplexed_model_id": name}  # noqa: E731
            many["cold_and_warm"] = cold_and_warm(url, names, image, by_header, tally)
            many["random_names_all_loaded"] = asyncio.run(steady(url, random_models(names, True), image, args.concurrency, args.seconds, 5, tally))
            ray_serve.delete(APP_NAME)
            on_ray(folder, True, 2, max_loaded=8)
            many["random_names_max_loaded_8"] = asyncio.run(steady(url, random_models(names, True), image, args.concurrency, args.seconds, 6, tally))
            result["many_models"]["ray_2_replicas"] = many
        finally:
            ray_serve.shutdown()
            ray.shutdown()

    result["torch_threads"] = {"one_process": "torch's default: the machine's cores", "ray_replica": 1}
    result["answers"] = dict(tally.statuses)
    result["score_spread"] = max(tally.scores) - min(tally.scores) if tally.scores else None
    result["ok"] = tally.ok()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}, indent=2))
    return 0 if result["ok"] else 1


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
