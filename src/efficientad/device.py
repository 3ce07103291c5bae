"""Where and in which arithmetic torch computes: devices, precisions, autocast and thread counts."""

from __future__ import annotations

import os
import warnings

import torch

from .choices import PRECISIONS, check_choice
from .errors import EfficientADError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A checked torch device; ``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise EfficientADError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise EfficientADError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EfficientADError("device 'cuda' requested but no CUDA GPU is available; use device='cpu'")
    return parsed


def cpu_supports_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow.

    Asked of the CPU's instruction sets, not of ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``:
    that also says yes on AVX-512 CPUs without BF16 (an Ice Lake Xeon here), where oneDNN emulates
    bf16 (README, "Precision").
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


# Environment variables that cap the instruction set of oneDNN's kernels (the second is its older
# name), then of ATen's own; and the oneDNN caps that keep it below AVX-512 whatever the CPU has.
_ONEDNN_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ISA_CAPS = (*_ONEDNN_CAPS, "ATEN_CPU_CAPABILITY")
_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def int8_kernels_have_vnni() -> bool:
    """Whether oneDNN's int8 convolutions here add their products in int32 (VNNI: AVX-512 VNNI or AMX).

    Without VNNI (AVX2; AVX-512 before Cascade Lake) they add pairs of uint8 x int8 products in int16,
    which saturates with full-range int8 weights; half-range weights fit (README, "Precision").
    """
    capped = any(os.environ.get(name, "").upper() in _WITHOUT_VNNI for name in _ONEDNN_CAPS)
    try:
        return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()) and not capped
    except (AttributeError, RuntimeError):
        return False


def channels_last_is_faster(precision: str, device: torch.device) -> bool:
    """Whether channels-last memory makes a training step faster here.

    On a CPU: with bf16 (native; README, "Training time") and, measured on a 2-core Ice Lake Xeon
    without bf16, with fp32 where oneDNN has AVX-512 (2.25 s a step against 2.65-3.08 s); on its AVX2
    code path channels-last was slower (3.61 s against 3.35 s), so not there. On a GPU: with bf16 only.
    """
    if precision == "bf16":
        return True
    if device.type != "cpu" or precision != "fp32":
        return False
    capped = any(os.environ.get(name, "").upper() in _BELOW_AVX512 for name in _ONEDNN_CAPS)
    try:
        return bool(torch.cpu._is_avx512_supported()) and not capped
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: torch.device) -> None:
    """Raise unless ``precision`` runs natively on ``device`` with this torch build.

    bf16 on a CPU without native bf16 is refused rather than run: oneDNN would emulate it more than
    ten times slower than fp32.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise EfficientADError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise EfficientADError(
            "this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 runs emulated and over 10x slower: use precision 'fp32'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EfficientADError("this GPU does not support bf16; use precision 'fp16'")


def usable_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it runs natively on ``device``, else fp32 with a warning that says why.

    For running a model file elsewhere than it was trained: its stored precision is a preference,
    and fp32 computes the same maps to within bf16/fp16 rounding.
    """
    try:
        check_precision(precision, device)
    except EfficientADError as error:
        warnings.warn(f"predicting in fp32 instead of the model's {precision}: {error}", stacklevel=2)
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast to ``precision`` (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def default_threads() -> int:
    """Threads to compute with: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, torch.get_num_threads())
