"""Browser check for the `efficientad serve` page: headless Chromium scores an image and shows its heat map.

Starts the server on 127.0.0.1, opens ``/?demo=1`` (the page draws a textured part with a scratch
and uploads it through the same code path as a dropped or picked file), waits for the answer, and
saves a screenshot. It then checks the page's final DOM: the upload was scored, a verdict and a
score are shown and the heat-map image loaded. Look at the screenshot to see the overlay.

Skipped (exit 0, with a message) where Chromium is not installed; Debian: apt-get install chromium.

    python benchmarks/browser_check.py --screenshot /tmp/efficientad-page.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _server import Server, tiny_model

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Headless and quiet: no GPU, no sandbox (root in a container), and no calls home of any kind.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)


def find_browser(requested: str | None) -> str | None:
    if requested:
        return shutil.which(requested)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def capture(browser: str, url: str, screenshot: Path, window: str, budget_ms: int, timeout: float) -> str:
    """Load ``url``, let it run for ``budget_ms`` of virtual time (network waits pause it), return the DOM."""
    with tempfile.TemporaryDirectory(prefix="efficientad-chromium-") as profile:
        command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
                   f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not screenshot.is_file():
        raise RuntimeError(f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def element_text(dom: str, element_id: str) -> str | None:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    return match.group(1).strip() if match else None


def coloured_fraction(screenshot: Path) -> float:
    """Share of strongly coloured pixels: the page is grey and white, the heat map is not."""
    rgb = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int16)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file to serve (default: train a tiny random-teacher one)")
    parser.add_argument("--screenshot", type=Path, default=Path(tempfile.gettempdir()) / "efficientad-page.png", help="where to save it")
    parser.add_argument("--browser", help=f"browser executable (default: the first of {', '.join(BROWSERS)} found)")
    parser.add_argument("--window", default="1200,1000", help="window size W,H")
    parser.add_argument("--budget-ms", type=int, default=60_000, help="virtual time the page gets to finish")
    parser.add_argument("--timeout", type=float, default=300.0, help="wall-clock seconds Chromium may take")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)

    browser = find_browser(args.browser)
    if browser is None:
        print(f"skipped: no Chromium found ({args.browser or ', '.join(BROWSERS)}); on Debian: apt-get install chromium")
        return 0

    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="efficientad-browser-") as scratch:
        scratch = Path(scratch)
        model = args.model or tiny_model(scratch)
        with Server(model, scratch / "server.log") as server:
            dom = capture(browser, f"{server.url}/?demo=1", args.screenshot, args.window, args.budget_ms, args.timeout)
            log_tail = server.log_tail()

    state = re.search(r'<body[^>]*data-state="([^"]*)"', dom)
    overlay = re.search(r'id="overlay"[^>]*src="(blob:[^"]+)"', dom)
    result = {
        "browser": browser,
        "screenshot": str(args.screenshot),
        "page_state": state.group(1) if state else None,
        "status": element_text(dom, "status"),
        "verdict": element_text(dom, "verdict"),
        "score": element_text(dom, "score"),
        "heatmap_loaded": bool(overlay),
        "coloured_fraction": round(coloured_fraction(args.screenshot), 4),
    }
    result["ok"] = bool(
        result["page_state"] == "scored"
        and result["verdict"] in ("NORMAL", "ANOMALOUS", "NO THRESHOLD")
        and re.fullmatch(r"-?\d+\.\d+", result["score"] or "")
        and result["heatmap_loaded"]
    )
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        print(f"FAILED; server log tail:\n{log_tail}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
