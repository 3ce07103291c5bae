"""Whether every path from image to score gives the same score, and whether a threshold keeps its meaning.

    python benchmarks/score_consistency.py [--json out.json]

1. A model trained (2 steps, random teacher: the maps' values are beside the point) on 20 copies of
   one 1024x1024 photo: the held-out copies set the threshold, so the photo must score exactly it.
2. One 1024x768 image through EfficientAD.predict, the Inferencer on model.pt, ONNX, OpenVINO and
   TorchScript exports, and the HTTP server: the relative difference of each score to predict's.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c) * np.cos(5 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    return (np.clip(0.5 + 0.35 * base + rng.normal(0, 0.15, (height, width, 3)), 0, 1) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="where to write the result (default: print only)")
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient
    from PIL import Image

    from efficientad import EfficientAD, Inferencer
    from efficientad.deploy.formats import export_model
    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record
    from efficientad.serve import create_app

    warnings.simplefilter("ignore")  # the random teacher's "testing only" warning
    big = photo(1024, 1024)
    detector = EfficientAD(teacher="random", steps=2, progress=False).fit([big] * 20)
    (prediction,) = detector.predict(big)
    result: dict = {
        "calibration_image": {
            "threshold": detector.threshold,
            "score": prediction.score,
            "relative_difference": prediction.score / detector.threshold - 1,
            "flagged": bool(prediction.is_anomalous),
        }
    }
    with tempfile.TemporaryDirectory() as folder:
        model = detector.save(Path(folder) / "model.pt")
        image = photo(768, 1024, seed=1)
        reference = detector.predict(image)[0].score
        scores = {"EfficientAD.predict": reference, "Inferencer model.pt": Inferencer.load(model).predict(image)[0].score}
        for format, name in (("onnx", "model.onnx"), ("openvino", "model.xml"), ("torchscript", "model.ts")):
            scores[f"Inferencer {format}"] = Inferencer.load(export_model(model, format, Path(folder) / name)).predict(image)[0].score
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        with TestClient(create_app(model)) as client:
            scores["HTTP /predict"] = client.post("/predict", content=buffer.getvalue()).json()["score"]
    result["image_1024x768"] = {name: {"score": score, "relative_to_predict": score / reference - 1} for name, score in scores.items()}
    result["system"] = system_info()
    print(json.dumps({key: value for key, value in result.items() if key != "system"}, indent=2))
    if args.json:
        write_run_record(args.json, {"benchmark": "score_consistency", **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
