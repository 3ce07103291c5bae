import json
import re
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from efficientad.cli import main
from efficientad.device import cpu_supports_bf16
from efficientad.errors import EfficientADError
from efficientad.deploy.formats import export_model
from efficientad.deploy.fused import FusedModel
from efficientad.deploy.inferencer import Inferencer
from efficientad.deploy.runtimes import OnnxRuntimeSession, TorchSession
from efficientad.model import EfficientADModel, load_model, map_scale, normalize_maps, pad_maps, save_model, to_image_grid



class Reference(NamedTuple):
    score: torch.Tensor
    anomaly_map: torch.Tensor
    local_map: torch.Tensor
    global_map: torch.Tensor
    at_image_size: torch.Tensor


@pytest.fixture(scope="module", params=["s", pytest.param("m", marks=pytest.mark.slow)])
def calibrated(request, tiny):
    """PDN-S: the session's tiny trained model. PDN-M: random weights with constants measured like
    training does, so that maps are O(0.1)."""
    torch.manual_seed(0)
    # Whole byte values, so that the same images given as uint8 arrays give the same results.
    images = torch.randint(0, 256, (2, 3, 256, 256)).float() / 255
    if request.param == "s":
        model = load_model(tiny.path)[0]
    else:
        model = EfficientADModel(request.param).eval()
        with torch.no_grad():
            features = model.teacher(model.normalize_input(images))
            model.teacher_mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
            model.teacher_std.copy_(features.std(dim=(0, 2, 3), keepdim=True))
            local, global_ = model.raw_maps(images).unbind(dim=1)
            model.map_quantiles.copy_(torch.stack([local.min() / 2, local.max(), global_.min() / 2, global_.max()]))
    with torch.no_grad():
        at_image_size = model(images)  # the plain path: maps at 256x256
        padded = pad_maps(normalize_maps(model.raw_maps(images), *map_scale(model.map_quantiles)))
    # What the fused module hands back: scores at the image size, maps at the padded 64x64 grid.
    reference = Reference(at_image_size[:, 0].amax(dim=(1, 2)), padded[:, 0:1], padded[:, 1:2], padded[:, 2:3], at_image_size)
    return model, images, reference


@pytest.fixture(scope="module")
def exported(calibrated, tiny, tiny_exports, tmp_path_factory):
    """Paths of the model file and its three exports, and the threshold they carry."""
    model, _, _ = calibrated
    if model.model_size == "s":
        return {**tiny_exports, "threshold": tiny.detector.threshold}
    folder = tmp_path_factory.mktemp("export")
    native = save_model(model, folder / "model.pt", {"threshold": 0.05})
    paths = {"native": native, "threshold": 0.05}
    for format, name in (("onnx", "model.onnx"), ("torchscript", "model.ts"), ("openvino", "model.xml")):
        paths[format] = export_model(native, format, folder / name)
    return paths


def _assert_outputs_close(outputs, reference, atol=1e-5):
    for got, want in zip(outputs, reference[:4]):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize("fuse_local_head", [True, False], ids=["local head fused", "teacher and student heads apart (int8)"])
def test_fused_module_equals_training_path(calibrated, fuse_local_head):
    model, images, reference = calibrated
    with torch.no_grad():
        outputs = FusedModel(model, fuse_local_head=fuse_local_head)(images)
    assert outputs[0].shape == (2,) and outputs[1].shape == (2, 1, 64, 64)
    _assert_outputs_close([t.numpy() for t in outputs], reference)


def test_uint8_input_folds_the_division(calibrated):
    model, images, _ = calibrated
    raw = (images[:1] * 255).round().to(torch.uint8)
    with torch.no_grad():
        from_bytes = FusedModel(model, input_dtype="uint8")(raw)
        from_floats = FusedModel(model)(raw.float() / 255)
    for a, b in zip(from_bytes, from_floats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _maps_at(model: EfficientADModel, images: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The plain path's normalised maps resized to ``size``."""
    with torch.no_grad():
        return to_image_grid(normalize_maps(model.raw_maps(images), *map_scale(model.map_quantiles)), size).numpy()


def test_output_size_and_channels_last_session(calibrated):
    model, images, reference = calibrated
    session = TorchSession(FusedModel(model, output_size=(100, 120)), channels_last=True, threads=2)
    output = session.run(images[:1].numpy())
    assert output.anomaly_map.shape == (1, 1, 100, 120)
    np.testing.assert_allclose(output.anomaly_map, _maps_at(model, images[:1], (100, 120))[:, 0:1], atol=1e-5, rtol=0)
    # The score stays the maximum at the model's image size, whatever size the maps come out at.
    np.testing.assert_allclose(output.score, reference.score[:1].numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "precision, device, avx512, cap, faster",
    [
        ("fp32", "cpu", True, "", True),
        ("fp32", "cpu", False, "", False),
        ("fp32", "cpu", True, "avx2", False),  # oneDNN capped below AVX-512: its AVX2 kernels were slower channels-last
        ("fp32", "cpu", True, "AVX512_CORE", True),
        ("bf16", "cpu", False, "", True),
        ("fp32", "cuda", True, "", False),
        ("bf16", "cuda", False, "", True),
    ],
)
def test_channels_last_where_it_was_measured_faster(monkeypatch, precision, device, avx512, cap, faster):
    from efficientad.device import channels_last_is_faster

    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert channels_last_is_faster(precision, torch.device(device)) is faster


@pytest.mark.parametrize(
    "vnni, amx, cap, expected",
    [(True, False, "", True), (False, True, "", True), (False, False, "", False), (True, False, "AVX2", False), (True, False, "avx512_core", False), (True, False, "AVX512_CORE_VNNI", True)],
)
def test_int8_kernels_have_vnni_unless_the_cpu_or_a_cap_says_otherwise(monkeypatch, vnni, amx, cap, expected):
    from efficientad.device import int8_kernels_have_vnni

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert int8_kernels_have_vnni() is expected


def test_benchmark_records_name_a_capped_instruction_set(monkeypatch):
    """A figure measured on the AVX2 code path of an AVX-512 CPU must say so: the CPU's flags alone would not."""
    from efficientad.deploy.speed import system_info

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert "instruction_set_cap" not in system_info()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert system_info()["instruction_set_cap"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    """oneDNN also offers bf16 on AVX-512 CPUs without BF16, emulated: auto must not take that for native."""
    from efficientad.device import check_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_supports_bf16() is native
    if not native:
        with pytest.raises(EfficientADError, match="no native bf16"):
            check_precision("bf16", torch.device("cpu"))


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")
def test_bf16_session_stays_close(calibrated):
    model, images, reference = calibrated
    module = FusedModel(model)
    output = TorchSession(module, precision="bf16", threads=2).run(images[:1])
    assert output.anomaly_map.dtype == np.float32
    assert module.local_head.weight.dtype == torch.float32, "the session must convert a copy"
    _assert_outputs_close(output, [m[:1] for m in reference[:4]], atol=0.02)


def test_uncalibrated_model_and_bad_precision_raise(calibrated):
    with pytest.raises(EfficientADError, match="quantiles"):
        FusedModel(EfficientADModel("s"))
    with pytest.raises(EfficientADError, match="'fp16' needs a CUDA device"):
        TorchSession(FusedModel(calibrated[0]), precision="fp16")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_onnx_and_torchscript_equal_eager(calibrated, exported):
    _, images, reference = calibrated
    _assert_outputs_close(OnnxRuntimeSession(exported["onnx"], threads=2).run(images.numpy()), reference)
    _assert_outputs_close(TorchSession(torch.jit.load(str(exported["torchscript"])), threads=2).run(images), reference)


@pytest.mark.parametrize("format", ["native", "onnx", "torchscript", "openvino"])
def test_inferencer_loads_each_format(format, calibrated, exported, tmp_path):
    _, images, reference = calibrated
    inferencer = Inferencer.load(exported[format])
    assert inferencer.threshold == exported["threshold"] and inferencer.image_size == (256, 256)

    picture = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    (prediction,) = inferencer.predict(picture)
    assert prediction.score == pytest.approx(float(reference.score[0]), abs=1e-5)
    # A 256x256 picture: its maps are the plain path's at the model's image size.
    np.testing.assert_allclose(prediction.anomaly_map, reference.at_image_size[0, 0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(prediction.global_map, reference.at_image_size[0, 2].numpy(), atol=1e-5, rtol=0)
    assert prediction.local_score == pytest.approx(float(reference.at_image_size[0, 1].max()), abs=1e-5)

    path = tmp_path / "image.png"
    Image.fromarray(picture).resize((300, 280)).save(path)
    (prediction,) = inferencer.predict(path)
    assert prediction.anomaly_map.shape == (280, 300)


def test_full_size_maps_are_made_only_when_asked_for(tiny):
    """A large photo's prediction holds the model's grid; maps at its size (or any other) come on demand."""
    inferencer = Inferencer.load(tiny.path)
    picture = np.random.default_rng(3).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    (prediction,) = inferencer.predict(picture)
    assert prediction.image_size == (3000, 4000)
    assert prediction.maps.shape[0] == 3 and prediction.maps.nbytes < 1e6
    assert "anomaly_map" not in vars(prediction)  # nothing of 12 million floats until asked for
    assert prediction.anomaly_map.shape == (3000, 4000)
    np.testing.assert_array_equal(prediction.map_at((3000, 4000), "global"), prediction.global_map)
    small = prediction.map_at((300, 400))
    assert small.shape == (300, 400)
    np.testing.assert_allclose(small.max(), prediction.anomaly_map.max(), rtol=0.05, atol=1e-6)
    with pytest.raises(EfficientADError, match="kind must be one of"):
        prediction.map_at((10, 10), "both")


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, "4", True])
def test_counts_that_are_not_positive_integers_are_refused_by_name(tiny, batch_size):
    """The serving settings and predict's batch size share one rule: an int >= 1 (not a bool, float or string)."""
    from efficientad.serve import create_app
    from efficientad.serve_many import ModelRegistry

    with pytest.raises(EfficientADError, match=rf"batch_size must be an integer >= 1, got {re.escape(repr(batch_size))}"):
        Inferencer.load(tiny.path).predict(np.zeros((256, 256, 3), np.uint8), batch_size=batch_size)
    with pytest.raises(EfficientADError, match="max_pending must be an integer >= 1"):
        create_app(tiny.path, max_pending=batch_size)
    with pytest.raises(EfficientADError, match="max_loaded must be an integer >= 1"):
        ModelRegistry(tiny.path.parent, max_loaded=batch_size)


@pytest.mark.slow
def test_export_cli_uint8_onnx_with_output_size(calibrated, exported, tmp_path):
    _, images, _ = calibrated
    out = tmp_path / "bytes.onnx"
    args = ["export", "--model", str(exported["native"]), "--format", "onnx", "--out", str(out)]
    assert main(args + ["--input-dtype", "uint8", "--output-size", "128", "96", "--threshold", "0.2"]) == 0
    inferencer = Inferencer.load(out)
    assert inferencer.input_dtype == "uint8" and inferencer.threshold == 0.2
    picture = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    output = inferencer.run(picture.transpose(2, 0, 1)[None].copy())
    assert output.anomaly_map.shape == (1, 1, 128, 96)
    np.testing.assert_allclose(output.anomaly_map, _maps_at(calibrated[0], images[:1], (128, 96))[:, 0:1], atol=1e-5, rtol=0)
    with pytest.raises(EfficientADError, match="takes uint8"):
        inferencer.run(images[:1].numpy())


def test_exported_metadata(exported):
    import onnx

    proto = onnx.load(str(exported["onnx"]))
    metadata = json.loads({p.key: p.value for p in proto.metadata_props}["efficientad"])
    assert metadata["image_size"] == [256, 256]
    assert metadata["threshold"] == exported["threshold"]
    assert metadata["output_names"] == ["score", "anomaly_map", "local_map", "global_map"]


def test_inferencer_rejects_other_files(tmp_path):
    with pytest.raises(EfficientADError, match="not found"):
        Inferencer.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EfficientADError, match="cannot load"):
        Inferencer.load(junk)


def test_export_cli_errors(exported, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "model file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", str(exported["native"]), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_bench_cli_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--runs", "2", "--warmup", "1", "--batch-size", "1", "--threads", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latency_batch1"]["runs"] == 2
    # auto: bf16 where the CPU has it natively, else fp32 (no int8 without a model).
    assert result["backend"] == "torch" and result["precision"] == ("bf16" if cpu_supports_bf16() else "fp32")
    assert result["precision_choice"].startswith(f"auto: {result['precision']}")
    assert {"cpu", "threads", "versions"} <= set(result["system"])
    assert "batch 1 median" in capsys.readouterr().out
