import hashlib
import warnings

import pytest
import torch

from efficientad.training import teacher as teacher_module
from efficientad.errors import EfficientADError
from efficientad.networks import pdn
from efficientad.training.teacher import OfficialTeacher, load_teacher_file, resolve_teacher

from .conftest import SHARED, requires_shared


def _reference_state(size="s"):
    torch.manual_seed(3)
    return pdn(size).state_dict()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_reference_layout_loads(tmp_path):
    state = _reference_state()
    torch.save(state, tmp_path / "teacher_small.pth")
    assert _same(load_teacher_file(tmp_path / "teacher_small.pth", "s").state_dict(), state)


@pytest.mark.parametrize("size,n_convs", [("s", 4), ("m", 6)])
def test_anomalib_layout_loads(tmp_path, size, n_convs):
    state = _reference_state(size)
    weight_keys = [k for k in state if k.endswith(".weight")]
    renamed = {}
    for number, key in enumerate(weight_keys, start=1):
        index = key.split(".")[0]
        renamed[f"conv{number}.weight"] = state[f"{index}.weight"]
        renamed[f"conv{number}.bias"] = state[f"{index}.bias"]
    assert len(weight_keys) == n_convs
    torch.save(renamed, tmp_path / "anomalib.pth")
    assert _same(load_teacher_file(tmp_path / "anomalib.pth", size).state_dict(), state)


def test_pretrain_output_layout_loads(tmp_path):
    state = _reference_state()
    torch.save({"format": "efficientad-teacher", "format_version": 1, "model_size": "s", "state_dict": state}, tmp_path / "t.pth")
    assert _same(load_teacher_file(tmp_path / "t.pth", "s").state_dict(), state)


def test_size_mismatch_is_explained(tmp_path):
    torch.save(_reference_state("s"), tmp_path / "small.pth")
    with pytest.raises(EfficientADError, match="PDN-s, but the model size is 'm'"):
        load_teacher_file(tmp_path / "small.pth", "m")


def test_wrong_shapes_are_explained(tmp_path):
    state = _reference_state()
    state["8.weight"] = torch.zeros(10, 256, 4, 4)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EfficientADError, match="does not fit a PDN-s"):
        load_teacher_file(tmp_path / "bad.pth", "s")


def test_garbage_file_is_explained(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EfficientADError, match="cannot read teacher file"):
        load_teacher_file(tmp_path / "junk.pth", "s")


def test_random_teacher_warns():
    with pytest.warns(UserWarning, match="randomly initialised teacher"):
        _, source = resolve_teacher("random", "s")
    assert source == "random"


def _fake_official(monkeypatch, tmp_path, payload: bytes):
    source = tmp_path / "served.pth"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    fake = OfficialTeacher("s", source.as_uri(), digest, "teacher_small.pth")
    monkeypatch.setitem(teacher_module.OFFICIAL_TEACHERS, "small", fake)
    monkeypatch.setenv("EFFICIENTAD_CACHE", str(tmp_path / "cache"))
    return source


def test_official_download_verifies_and_caches_offline(monkeypatch, tmp_path):
    state = _reference_state()
    torch.save(state, tmp_path / "weights.pth")
    source = _fake_official(monkeypatch, tmp_path, (tmp_path / "weights.pth").read_bytes())
    teacher, origin = resolve_teacher("small", "s", progress=False)
    assert origin == "official:small" and _same(teacher.state_dict(), state)
    assert (tmp_path / "cache" / "teacher_small.pth").is_file()
    source.unlink()  # a second call must use the cache, not the network
    teacher, _ = resolve_teacher(None, "s", progress=False)
    assert _same(teacher.state_dict(), state)


def test_official_download_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    _fake_official(monkeypatch, tmp_path, b"tampered")
    fake = teacher_module.OFFICIAL_TEACHERS["small"]
    monkeypatch.setitem(teacher_module.OFFICIAL_TEACHERS, "small", OfficialTeacher("s", fake.url, "0" * 64, fake.filename))
    with pytest.raises(EfficientADError, match="SHA-256"):
        resolve_teacher("small", "s", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_unreachable_download_says_what_to_do(monkeypatch, tmp_path):
    fake = OfficialTeacher("s", (tmp_path / "absent.pth").as_uri(), "0" * 64, "teacher_small.pth")
    monkeypatch.setitem(teacher_module.OFFICIAL_TEACHERS, "small", fake)
    monkeypatch.setenv("EFFICIENTAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EfficientADError, match="pass its path as the teacher"):
        resolve_teacher("small", "s", progress=False)


def test_official_teacher_size_must_match():
    with pytest.raises(EfficientADError, match="use model size 's'"):
        resolve_teacher("small", "m")


@requires_shared("weights", "teacher_small_r18.pth")
def test_shared_teacher_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher = load_teacher_file(SHARED / "weights" / "teacher_small_r18.pth", "s")
    with torch.no_grad():
        assert teacher(torch.zeros(1, 3, 256, 256)).shape == (1, 384, 56, 56)
