"""The layout's rules, checked in a fresh interpreter: deployment loads no training code, the public face is lazy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from efficientad.choices import EXPORT_FORMATS
from efficientad.deploy.formats import FORMATS

PROBE = """
import json, sys
loaded = lambda: sorted(m for m in sys.modules if m.startswith(("efficientad", "torch")))
import efficientad
from efficientad.cli import build_parser
build_parser()
before_use = loaded()
import efficientad.serve, efficientad.serve_many, efficientad.serve_ray, efficientad.evaluation.evaluate, efficientad.cli.serve
serving = loaded()
ray_loaded = "ray" in sys.modules
from efficientad import EfficientAD, Inferencer, Prediction, EfficientADError, TrainConfig
print(json.dumps({"before_use": before_use, "serving": serving, "ray": ray_loaded, "public": EfficientAD.__module__}))
"""


@pytest.mark.slow  # a fresh interpreter importing torch and the serving stack; `lint-imports` is the fast check
def test_import_rules_hold_in_a_fresh_interpreter():
    result = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    # `import efficientad` and `efficientad --help` load no torch.
    assert "torch" not in result["before_use"]
    # The serving stack loads the deployed path and nothing of training.
    assert "efficientad.deploy.inferencer" in result["serving"]
    assert [m for m in result["serving"] if m.startswith(("efficientad.training", "efficientad.detector"))] == []
    # Ray is an extra: the serving stack, Ray Serve module included, imports it only when serving on Ray.
    assert result["ray"] is False
    # The public names load on first use.
    assert result["public"] == "efficientad.detector"


def test_every_export_format_has_one_writer_and_opener():
    assert tuple(FORMATS) == EXPORT_FORMATS
