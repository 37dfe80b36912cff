"""CPU-only tuning of the torch engine, in one place: the allocator and packed weights.

Both lean on things outside torch's public API (glibc's `mallopt`; the private
`torch.ops.mkldnn` linear ops that vLLM's and SGLang's CPU backends also use), so each is
guarded: by libc, by torch version and by the ops' presence, and each is switched by the
engine config (`keep_freed_memory`, `prepack_weights`). The other packed layout,
mmserve::panel_linear's, is the engine's own (csrc/panel_linear.cpp, `cpu_linear`).
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)

# The packed-linear ops with the signatures used here exist since torch 2.1; older builds
# and builds without oneDNN run the dense path.
_MIN_TORCH = (2, 1)

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024**2  # the largest value glibc accepts on 64-bit


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default, blocks of a few MiB come from mmap and freed heap tops are trimmed, so each
    step's temporaries (activations, logits) fault their pages in again: at 64 decoding
    sequences on CPU that was 8.7 M page faults and a third of the run in the kernel, and
    decode steps took 416 ms instead of 263 ms. Process-wide; False where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Both, in this order: a fixed trim threshold alone also freezes the mmap threshold at
    # its 128 KiB default, which is worse than leaving both alone.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _has_packed_ops() -> bool:
    ops = torch.ops.mkldnn
    return (_torch_version() >= _MIN_TORCH and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether projections can run on oneDNN's packed weights: CPU, fp32 or (on CPUs with
    native bf16 arithmetic, e.g. AVX-512 BF16 or AMX) bf16."""
    if device.type != "cpu" or not _has_packed_ops():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack_weight(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """[out, in] weight in oneDNN's blocked layout for `packed_linear` (an opaque tensor),
    tuned for matmuls of about `batch_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with a weight from `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")


PANEL = 16  # mmserve::pack_panels' panel width: out_features must be a multiple of it


def pack_for_cpu(weight: torch.Tensor, batch_hint: int, panels: bool) -> torch.Tensor:
    """The packed form of a [out, in] weight: mmserve::pack_panels' panels (a 3-d tensor) when
    asked and the shape allows (bf16 takes k in pairs), else oneDNN's blocked layout."""
    if panels and weight.shape[0] % PANEL == 0 and (
            weight.dtype == torch.float32 or weight.shape[1] % 2 == 0):
        return torch.ops.mmserve.pack_panels(weight.contiguous())
    return pack_weight(weight, batch_hint)


def cpu_packed_linear(x: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with a weight from `pack_for_cpu`, on whichever kernel packed it."""
    if packed.dim() == 3:
        return torch.ops.mmserve.panel_linear(x, packed, bias)
    return packed_linear(x, packed, bias)
