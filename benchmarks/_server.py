"""Shared by the serving scripts: a model file to serve, and `efficientad serve` in a subprocess on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"


def demo_texture(rng: np.random.Generator) -> np.ndarray:
    """The textured part that the page's ``?demo=1`` draws (before its scratch), as a 256x256 RGB array."""
    y, x = np.mgrid[0:256, 0:256]
    value = 140 + 40 * np.sin(x / 6) * np.cos(y / 9) + 20 * rng.random((256, 256))
    return np.clip(np.stack([value, value * 0.95, value * 0.85], axis=-1) + 0.5, 0, 255).astype(np.uint8)


def tiny_model(folder: Path) -> Path:
    """Train a 2-step random-teacher model on the demo texture: seconds of work.

    Even that barely trained model is calibrated on the texture, so the demo's scratch stands out
    on the heat map and a screenshot shows a map worth looking at.
    """
    from efficientad.detector import EfficientAD

    rng = np.random.default_rng(0)
    images = [demo_texture(rng) for _ in range(10)]
    print("no --model given: training a tiny random-teacher model on a synthetic texture", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = EfficientAD(teacher="random", steps=2, progress=False).fit(images)
    return detector.save(folder / "model.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Server:
    """``efficientad serve`` on loopback, started on entry and stopped (terminated, then killed) on exit.

    ``model`` is a model file, or with ``target="--models"`` a folder of them.
    """

    def __init__(self, model: Path, log: Path, extra: list[str] | None = None, start_timeout: float = 180.0, target: str = "--model"):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = [sys.executable, "-m", "efficientad", "serve", target, str(model), "--host", HOST,
                        "--port", str(self.port), "--log-level", "warning", *(extra or [])]
        self.log = log
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
