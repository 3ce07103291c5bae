"""The runtimes that run a :class:`~efficientad.deploy.fused.FusedModel`, and the one factory for them.

Every session has ``run(images) -> InferenceOutput`` (host arrays in, host arrays out).
:func:`make_session` builds one for a backend and precision from an in-memory fused model; it is
what :class:`~efficientad.deploy.inferencer.Inferencer`, calibration and ``efficientad bench`` use.
Exported files are opened in :mod:`efficientad.deploy.formats`, which builds the same session classes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..choices import BACKEND_PRECISIONS, BACKENDS, check_choice
from ..device import check_precision, default_threads, resolve_device
from ..errors import EfficientADError, first_line
from .fused import FusedModel
from .graphs import onnx_bytes, openvino_model, quantize_int8, require_openvino


class InferenceOutput(NamedTuple):
    """Scores (N,) and maps (N, 1, H, W), float32 on the host.

    ``anomaly_map`` is the combined map; ``score`` is its maximum at the model's image size.
    """

    score: np.ndarray
    anomaly_map: np.ndarray
    local_map: np.ndarray
    global_map: np.ndarray


def check_batch(images: np.ndarray | torch.Tensor, image_size: tuple[int, int], input_dtype: str) -> np.ndarray | torch.Tensor:
    """Raise unless ``images`` is a (N, 3, H, W) batch at ``image_size`` in ``input_dtype``; returns it."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1] != 3 or tuple(shape[2:]) != tuple(image_size):
        raise EfficientADError(f"expected a batch of shape (N, 3, {image_size[0]}, {image_size[1]}), got {shape}")
    dtype = str(images.dtype).replace("torch.", "")
    if dtype != input_dtype:
        raise EfficientADError(f"this model takes {input_dtype} images, got {dtype}")
    return images


def _host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class TorchSession:
    """Runs a :class:`FusedModel` (or a TorchScript export of one) with PyTorch.

    - ``precision``: ``"fp32"``; ``"bf16"`` (oneDNN on CPUs with AVX-512 bf16/AMX, or CUDA) and
      ``"fp16"`` (CUDA only) convert the convolutions; constants, squares, means and maps stay float32.
      TorchScript exports run in fp32 only (their traced graph fixes the dtype).
    - ``channels_last`` (default on): NHWC activations, about twice as fast on CPU and what tensor
      cores want on GPU.
    - ``compile``: ``torch.compile`` (on CPU with weight freezing; on CUDA with ``mode="reduce-overhead"``,
      which replays CUDA graphs). The first call per batch size compiles, which takes minutes.
    - ``cuda_graphs``: without compiling, capture one CUDA graph per batch size and replay it, which
      removes the per-kernel launch cost that dominates batch-1 latency on a GPU.
    """

    def __init__(
        self,
        module: FusedModel | torch.jit.ScriptModule,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ):
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise EfficientADError("cuda_graphs need a CUDA device")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN time its algorithms once
        if cuda_graphs and compile:
            raise EfficientADError("choose either CUDA graphs or torch.compile (which uses CUDA graphs itself on CUDA)")
        scripted = isinstance(module, torch.jit.ScriptModule)
        if scripted and precision != "fp32":
            raise EfficientADError("TorchScript exports run in fp32; use the model file or ONNX/OpenVINO for bf16/fp16")
        self.precision = precision
        self.threads = threads or default_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        # A copy: the conversions below work in place, and the caller's module may serve other sessions.
        module = copy.deepcopy(module).to(self.device).eval()
        if precision != "fp32":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            # Only the convolutions: the folded constants (input mean, map scales) keep float32 digits.
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    layer.to(dtype)
        self.channels_last = channels_last
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        if compile:
            if self.device.type == "cuda":
                self.forward = torch.compile(module, mode="reduce-overhead")
            else:
                self.forward = torch.compile(module, options={"freezing": True})
        else:
            self.forward = module
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[tuple[int, ...], torch.dtype], tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def _replay(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (tuple(images.shape), images.dtype)
        if key not in self._graphs:
            static_input = images.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the graph: cuDNN picks its algorithms here
                    self.forward(static_input)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.forward(static_input)
            self._graphs[key] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[key]
        static_input.copy_(images)
        graph.replay()
        return static_output

    def _to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            # Elementwise ops keep this layout, so every convolution after them sees NHWC.
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @torch.inference_mode()
    def run_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward a (N, 3, H, W) tensor; returns (score, anomaly_map, local_map, global_map) on the device.

        With CUDA graphs the returned tensors are the graph's own: the next call overwrites them.
        """
        images = self._to_device(images)
        if self.cuda_graphs:
            return self._replay(images)
        return self.forward(images)

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Forward a (N, 3, H, W) batch; returns host arrays."""
        return InferenceOutput(*(_host(t) for t in self.run_tensors(images)))

    @torch.inference_mode()
    def raw_maps(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The un-normalised (local, global) maps (N, 2, h, w) in this session's arithmetic: what calibration measures."""
        if not isinstance(self.module, FusedModel):
            raise EfficientADError("raw maps need the fused module, not an exported graph")
        return _host(self.module.raw_maps(self._to_device(images)))


class OnnxRuntimeSession:
    """Runs an ONNX export with ONNX Runtime (all graph optimisations, ``threads`` intra-op threads).

    ``source`` is a file path or the model's bytes. ``device="cuda"`` uses the CUDA execution
    provider when this onnxruntime build has it.
    """

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        self.threads = threads or default_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EfficientADError("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        model = source if isinstance(source, bytes) else str(source)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            where = "the given ONNX model" if isinstance(source, bytes) else str(source)
            raise EfficientADError(f"cannot load {where} with ONNX Runtime: {first_line(error)}") from None
        self.metadata_text = self.session.get_modelmeta().custom_metadata_map.get("efficientad")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Forward a (N, 3, H, W) batch; returns host arrays."""
        if isinstance(images, torch.Tensor):
            images = images.numpy()
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images)})
        return InferenceOutput(*outputs)


OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVinoSession:
    """Runs an OpenVINO model (IR file path or in-memory ``openvino.Model``) on the CPU.

    ``precision`` sets OpenVINO's inference precision hint (``"fp32"``, ``"bf16"``, ``"fp16"``);
    ``None`` keeps OpenVINO's own choice, which is bf16 on CPUs with AVX-512 bf16 or AMX. Each batch
    size is compiled once for a static shape, which the CPU plugin runs faster than a dynamic one.
    """

    def __init__(self, source, precision: str | None = "fp32", threads: int | None = None, device: str = "CPU"):
        ov = require_openvino()
        self.core = ov.Core()
        if isinstance(source, (str, os.PathLike)):
            try:
                source = self.core.read_model(str(source))
            except Exception as error:  # OpenVINO raises RuntimeError subclasses with multi-line messages
                raise EfficientADError(f"cannot read OpenVINO model {source}: {first_line(error)}") from None
        self.model = source
        self.metadata_text = source.get_rt_info("efficientad").astype(str) if source.has_rt_info("efficientad") else None
        self.threads = threads or default_threads()
        self.device = device.upper()
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        self._requests: dict[tuple[int, ...], Any] = {}
        self.set_precision(precision)

    def set_precision(self, precision: str | None) -> None:
        """Change the precision hint (``None``: OpenVINO's own choice); later runs compile again."""
        if precision is None:
            self.config.pop("INFERENCE_PRECISION_HINT", None)
        else:
            check_choice("precision", precision, OPENVINO_PRECISIONS)
            self.config["INFERENCE_PRECISION_HINT"] = OPENVINO_PRECISIONS[precision]
        self._requests.clear()

    def _request(self, shape: tuple[int, ...]):
        if shape not in self._requests:
            model = self.model.clone()
            model.reshape({0: list(shape)})
            self._requests[shape] = self.core.compile_model(model, self.device, self.config).create_infer_request()
        return self._requests[shape]

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO computes in (its own default when none was set)."""
        shape = next(iter(self._requests), None)
        if shape is None:
            shape = (1, *(dimension.get_length() for dimension in self.model.inputs[0].get_partial_shape()[1:]))
        hint = self._request(shape).get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        names = {value: key for key, value in OPENVINO_PRECISIONS.items()}
        return names.get(hint.get_type_name(), hint.get_type_name())

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Forward a (N, 3, H, W) batch; returns host arrays."""
        if isinstance(images, torch.Tensor):
            images = images.numpy()
        images = np.ascontiguousarray(images)
        request = self._request(tuple(images.shape))
        request.infer({0: images})
        return InferenceOutput(*(request.get_output_tensor(i).data.copy() for i in range(4)))


def make_session(
    module: FusedModel,
    backend: str = "torch",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    *,
    compile: bool = False,
    cuda_graphs: bool = False,
    calibration: Sequence[np.ndarray] = (),
) -> TorchSession | OnnxRuntimeSession | OpenVinoSession:
    """A session that runs ``module`` with ``backend`` at ``precision`` (see ``choices.BACKEND_PRECISIONS``).

    ``compile`` and ``cuda_graphs`` apply to the torch backend; int8 quantises with ``calibration``
    batches of normal images.
    """
    check_choice("backend", backend, BACKENDS)
    if precision not in BACKEND_PRECISIONS[backend]:
        raise EfficientADError(f"backend {backend!r} offers precisions {', '.join(BACKEND_PRECISIONS[backend])}, not {precision!r}")
    if backend != "torch" and (compile or cuda_graphs):
        raise EfficientADError("compile and cuda_graphs apply to the torch backend only")
    if backend == "torch":
        return TorchSession(module, device, precision, compile=compile, cuda_graphs=cuda_graphs, threads=threads)
    if backend == "openvino":
        require_openvino()
        if str(device) != "cpu":
            raise EfficientADError("the OpenVINO backend here runs on the CPU only")
    graph = onnx_bytes(module)
    if precision == "int8":
        graph = quantize_int8(graph, calibration)
    if backend == "onnxruntime":
        return OnnxRuntimeSession(graph, threads, str(device))
    # int8: the quantised convolutions run in int8 whatever the hint; f32 keeps the rest exact.
    return OpenVinoSession(openvino_model(graph), "fp32" if precision == "int8" else precision, threads)
