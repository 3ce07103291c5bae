"""The layout's rules, checked in fresh interpreters: deployment loads no training code, the public face is lazy."""

from __future__ import annotations

import subprocess
import sys

from efficientad.choices import EXPORT_FORMATS
from efficientad.deploy.formats import FORMATS


def _loaded_modules(code: str) -> set[str]:
    """The efficientad and torch modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith(('efficientad', 'torch'))))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_serving_and_evaluation_load_no_training_code():
    loaded = _loaded_modules("import efficientad.serve, efficientad.evaluation.evaluate, efficientad.cli.serve")
    assert "efficientad.deploy.inferencer" in loaded  # the probe did import the serving stack
    training = sorted(m for m in loaded if m.startswith(("efficientad.training", "efficientad.detector")))
    assert training == []


def test_the_public_face_is_lazy():
    assert not any(m == "torch" for m in _loaded_modules("import efficientad"))
    loaded = _loaded_modules("from efficientad import EfficientAD, Inferencer, Prediction, EfficientADError, TrainConfig")
    assert {"efficientad.detector", "efficientad.deploy.inferencer"} <= loaded


def test_the_cli_help_needs_no_torch():
    assert "torch" not in _loaded_modules("from efficientad.cli import build_parser\nbuild_parser()")


def test_every_export_format_has_one_writer_and_opener():
    assert tuple(FORMATS) == EXPORT_FORMATS
