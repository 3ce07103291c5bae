"""Output files appear whole or not at all, and what a killed run leaves behind is cleaned by the next one."""

import signal
import subprocess
import sys

import pytest

from efficientad.files import atomic_path, check_output_folder, remove_temporary_files

# A child that dies by kill -9 in the middle of an atomic write, as a killed `efficientad train` would.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from efficientad.files import atomic_write

def write_forever(temporary):
    Path(temporary).write_bytes(b"half a model")
    print("writing", flush=True)
    time.sleep(600)

atomic_write(sys.argv[1], write_forever)
"""


def test_the_next_run_removes_what_a_killed_write_left(tmp_path, capsys):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "model.pt")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (orphan,) = tmp_path.glob(".model.pt.*.tmp")
    assert not (tmp_path / "model.pt").exists()
    check_output_folder(tmp_path)
    assert not orphan.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed 1 temporary file(s)" in err and orphan.name in err
    check_output_folder(tmp_path)
    assert capsys.readouterr().err == ""


def test_only_our_own_pattern_is_removed_and_subfolders_only_when_named(tmp_path, capsys):
    ours = [tmp_path / ".scores.csv.k2_9xq0a.tmp", tmp_path / "overlays" / "good" / ".000.png.abcdefgh.tmp"]
    others = [
        tmp_path / ".notes.tmp",  # no random part
        tmp_path / "model.pt.abcdefgh.tmp",  # not hidden
        tmp_path / ".model.pt.ABCDEFGH.tmp",  # not mkstemp's characters
        tmp_path / ".model.pt.abcdefgh.tmp.bak",
        tmp_path / "elsewhere" / ".x.abcdefgh.tmp",  # a subfolder the command does not write into
    ]
    for path in ours + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    check_output_folder(tmp_path, subfolders=("overlays",))
    assert [path.exists() for path in ours + others] == [False] * len(ours) + [True] * len(others)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_a_file_another_run_is_writing_is_kept(tmp_path):
    with atomic_path(tmp_path / "model.onnx") as temporary:
        with open(temporary, "wb") as file:
            file.write(b"still writing")
        assert remove_temporary_files(tmp_path) == []
    assert (tmp_path / "model.onnx").read_bytes() == b"still writing"
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "a.json") as temporary:
        with open(temporary, "w") as file:
            file.write("{")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []



def test_an_openvino_export_stopped_before_its_xml_leaves_no_mismatched_pair(tiny, tmp_path, monkeypatch):
    from efficientad.deploy import formats

    pytest.importorskip("openvino")
    (tmp_path / "model.xml").write_text("<?xml version='1.0'?><net name='an older export'/>")
    (tmp_path / "model.bin").write_bytes(b"its weights")
    real_copy = formats.shutil.copyfile

    def killed_before_the_xml(source, target):
        if str(source).endswith(".xml"):
            raise KeyboardInterrupt
        return real_copy(source, target)

    monkeypatch.setattr(formats.shutil, "copyfile", killed_before_the_xml)
    with pytest.raises(KeyboardInterrupt):
        formats.export_model(tiny.path, "openvino", tmp_path / "model.xml")
    # The new weights are in; the old .xml, which would have read them as its own, is gone.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.bin"]
    assert (tmp_path / "model.bin").stat().st_size > 1000
