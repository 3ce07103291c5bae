"""Inference-only EfficientAD: image in, score and anomaly maps out, in one ``forward``.

:class:`InferenceModel` computes what :class:`~efficientad.model.EfficientADModel` plus
:func:`~efficientad.model.to_image_grid` compute, with every constant folded away:

- ImageNet normalisation: one subtraction of the mean shared by all three networks, the division by
  the standard deviation (and by 255 for uint8 input) folded into their first convolutions. The mean
  cannot go into the biases because the autoencoder's first convolution pads with zeros, and zero
  must keep meaning "the mean colour" there;
- the teacher's output normalisation (mean/std per channel) folded into its last convolution;
- teacher minus student: the teacher's last convolution and the first half of the student's last
  convolution run as one convolution over both inputs, which yields the difference directly (in
  bf16 it is then rounded relative to the difference, not to the larger features);
- the map quantiles become one scale and offset per map.

Running the teacher's and student's identically shaped layers as single convolutions (concatenated
outputs for the first, two groups after it) was tried and dropped: on an AVX-512 CPU with oneDNN it
was 3-7% slower than the separate convolutions, in fp32 and bf16.

:class:`TorchSession` runs it on a device with a precision (fp32, bf16, fp16 on CUDA), channels-last,
optionally with ``torch.compile`` or CUDA graphs; :class:`OnnxRuntimeSession` and
:class:`OpenVinoSession` run its exports. Nothing here imports the training code.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import EfficientADError
from .model import MAP_PADDING, EfficientADModel
from .networks import TEACHER_CHANNELS

PRECISIONS = ("fp32", "bf16", "fp16")
INPUT_DTYPES = ("float32", "uint8")


class InferenceOutput(NamedTuple):
    """Scores (N,) and maps (N, 1, H, W), float32 on the host.

    ``anomaly_map`` is the combined map; its maximum is ``score``.
    """

    score: np.ndarray
    anomaly_map: np.ndarray
    local_map: np.ndarray
    global_map: np.ndarray


def _stages(network: nn.Sequential) -> list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]]:
    """A PDN as (conv, ReLU after it, pooling after that) triples."""
    stages: list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]] = []
    for layer in network:
        if isinstance(layer, nn.Conv2d):
            stages.append((layer, False, None))
        elif isinstance(layer, nn.ReLU):
            stages[-1] = (stages[-1][0], True, None)
        elif isinstance(layer, nn.AvgPool2d):
            stages[-1] = (stages[-1][0], stages[-1][1], layer)
        else:
            raise EfficientADError(f"unexpected layer {type(layer).__name__} in a PDN")
    return stages


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)


def _trunk(stages: list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for conv, relu, pool in stages:
        layers.append(copy.deepcopy(conv))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        if pool is not None:
            layers.append(copy.deepcopy(pool))
    return nn.Sequential(*layers)


class InferenceModel(nn.Module):
    """EfficientAD from image to score in one ``forward``, with all constants folded into weights.

    Built from a calibrated :class:`EfficientADModel` (whose weights it copies; later changes to that
    model do not reach it). ``forward(images)`` takes (N, 3, H, W) at the model's ``image_size``,
    floats in [0, 1] or, with ``input_dtype="uint8"``, bytes in [0, 255], and returns
    ``(score, anomaly_map, local_map, global_map)``: scores (N,) and maps (N, 1, *output_size*),
    always float32. ``output_size`` defaults to ``image_size``.
    """

    def __init__(
        self,
        model: EfficientADModel,
        output_size: Sequence[int] | None = None,
        input_dtype: str = "float32",
    ):
        super().__init__()
        if not model.is_calibrated:
            raise EfficientADError("the model has no map quantiles yet: train (fit) it before exporting or benchmarking")
        if input_dtype not in INPUT_DTYPES:
            raise EfficientADError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        self.model_size = model.model_size
        self.image_size = tuple(model.image_size)
        self.output_size = self.image_size if output_size is None else tuple(int(v) for v in output_size)
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise EfficientADError(f"output_size must be (height, width) of positive ints, got {output_size!r}")
        self.input_dtype = input_dtype

        self._build(copy.deepcopy(model).float().cpu())
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def _build(self, model: EfficientADModel) -> None:
        scale = 255.0 if self.input_dtype == "uint8" else 1.0
        # (x*scale - mean)/std = (x - mean/scale) * (1/(scale*std)): subtract here, multiply in the conv.
        self.register_buffer("input_offset", (model.input_mean * scale).clone())
        input_gain = (1.0 / (model.input_std * scale)).view(1, 3, 1, 1)

        teacher = _stages(model.teacher)
        student = _stages(model.student)
        if any(teacher[0][0].padding) or any(student[0][0].padding):
            # The autoencoder's zero padding is why the mean is subtracted outside the convolutions;
            # a padded PDN would be no different, but nothing here was checked for that case.
            raise EfficientADError("expected the anomaly-detection PDNs, whose first convolution is unpadded")

        def scaled_first(conv: nn.Conv2d) -> nn.Conv2d:
            folded = copy.deepcopy(conv)
            folded.weight.mul_(input_gain)
            return folded

        # Teacher output normalisation into its last conv: (W h + b - mean) / std.
        last_t = copy.deepcopy(teacher[-1][0])
        std = model.teacher_std.view(-1)
        last_t.weight.div_(std.view(-1, 1, 1, 1))
        last_t.bias.sub_(model.teacher_mean.view(-1)).div_(std)
        teacher = [(scaled_first(teacher[0][0]), *teacher[0][1:])] + teacher[1:-1] + [(last_t, *teacher[-1][1:])]
        student = [(scaled_first(student[0][0]), *student[0][1:])] + student[1:]

        self.teacher_trunk = _trunk(teacher[:-1])
        self.student_trunk = _trunk(student[:-1])

        # teacher - student[:384] as one conv over the concatenated inputs: W_t h_t - W_s h_s.
        last_s = student[-1][0]
        self.local_head = _conv_like(last_t, last_t.in_channels + last_s.in_channels, TEACHER_CHANNELS)
        self.local_head.weight.copy_(torch.cat([last_t.weight, -last_s.weight[:TEACHER_CHANNELS]], dim=1))
        self.local_head.bias.copy_(last_t.bias - last_s.bias[:TEACHER_CHANNELS])
        self.global_head = _conv_like(last_s, last_s.in_channels, TEACHER_CHANNELS)
        self.global_head.weight.copy_(last_s.weight[TEACHER_CHANNELS:])
        self.global_head.bias.copy_(last_s.bias[TEACHER_CHANNELS:])

        layers = [copy.deepcopy(m) for m in model.autoencoder if not isinstance(m, nn.Dropout)]
        layers[0].weight.mul_(input_gain)
        self.autoencoder = nn.Sequential(*layers)

        # 0.1 * (m - q_start) / (q_end - q_start) = m * gain + offset, per map.
        q = model.map_quantiles.double()
        gains = torch.stack([0.1 / (q[1] - q[0]), 0.1 / (q[3] - q[2])])
        offsets = torch.stack([-q[0], -q[2]]) * gains
        if not torch.isfinite(gains).all() or (gains <= 0).any():
            raise EfficientADError("the model's map quantiles are degenerate (q0.995 <= q0.9)")
        self.register_buffer("map_gain", gains.float().view(1, 2, 1, 1))
        self.register_buffer("map_offset", offsets.float().view(1, 2, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The convolutions' dtype: TorchSession converts only them to bf16/fp16, never the constants.
        x = (images.float() - self.input_offset).to(self.autoencoder[0].weight.dtype)
        student = self.student_trunk(x)
        local_difference = self.local_head(torch.cat([self.teacher_trunk(x), student], dim=1))
        global_difference = self.autoencoder(x) - self.global_head(student)
        # Squares and means in float32 even in bf16/fp16: half-precision sums of 384 squares lose digits.
        raw = torch.cat(
            [
                local_difference.float().pow(2).mean(dim=1, keepdim=True),
                global_difference.float().pow(2).mean(dim=1, keepdim=True),
            ],
            dim=1,
        )
        maps = raw * self.map_gain + self.map_offset
        maps = torch.cat([maps.mean(dim=1, keepdim=True), maps], dim=1)
        maps = F.pad(maps, (MAP_PADDING,) * 4)
        maps = F.interpolate(maps, size=self.output_size, mode="bilinear", align_corners=False)
        combined = maps[:, 0:1]
        return combined.amax(dim=(1, 2, 3)), combined, maps[:, 1:2], maps[:, 2:3]


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


def default_threads() -> int:
    """Threads to compute with: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, torch.get_num_threads())


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: torch.device) -> None:
    """Raise unless ``precision`` runs on ``device`` with this torch build."""
    if precision not in PRECISIONS:
        raise EfficientADError(f"precision must be one of {PRECISIONS} for the torch backend, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise EfficientADError("precision fp16 needs --device cuda; on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise EfficientADError("this CPU (or torch build) has no bf16 support in oneDNN; use fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EfficientADError("this GPU does not support bf16; use fp16")


class TorchSession:
    """Runs an :class:`InferenceModel` (or a TorchScript export of one) with PyTorch.

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
        module: InferenceModel | torch.jit.ScriptModule,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EfficientADError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        check_precision(precision, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise EfficientADError("CUDA graphs need --device cuda")
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

    @torch.inference_mode()
    def run_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward a (N, 3, H, W) tensor; returns (score, anomaly_map, local_map, global_map) on the device.

        With CUDA graphs the returned tensors are the graph's own: the next call overwrites them.
        """
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            # Elementwise ops keep this layout, so every convolution after them sees NHWC.
            images = images.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:
            return self._replay(images)
        return self.forward(images)

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Forward a (N, 3, H, W) batch; returns host arrays."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        outputs = self.run_tensors(images)
        return InferenceOutput(*(_host(t) for t in outputs))


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
            raise EfficientADError(f"cannot load {where} with ONNX Runtime: {str(error).splitlines()[0]}") from None
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
        from .export import require_openvino

        ov = require_openvino()
        if precision is not None and precision not in OPENVINO_PRECISIONS:
            raise EfficientADError(f"precision must be one of {sorted(OPENVINO_PRECISIONS)} for OpenVINO, got {precision!r}")
        self.core = ov.Core()
        if isinstance(source, (str, os.PathLike)):
            try:
                source = self.core.read_model(str(source))
            except Exception as error:  # OpenVINO raises RuntimeError subclasses with multi-line messages
                raise EfficientADError(f"cannot read OpenVINO model {source}: {str(error).splitlines()[0]}") from None
        self.model = source
        self.metadata_text = source.get_rt_info("efficientad").astype(str) if source.has_rt_info("efficientad") else None
        self.threads = threads or default_threads()
        self.device = device.upper()
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        if precision is not None:
            self.config["INFERENCE_PRECISION_HINT"] = OPENVINO_PRECISIONS[precision]
        self._requests: dict[tuple[int, ...], Any] = {}

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
