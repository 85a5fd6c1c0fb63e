"""Which devices this host has, and how much memory each has free.

torch_npu is imported only when an NPU is asked for: on a host without CANN
it cannot import (and, installed, breaks `import torch` unless
TORCH_DEVICE_BACKEND_AUTOLOAD=0), so nothing here touches it otherwise.
"""

from __future__ import annotations

import torch

from aotllm.graphs.devices import AUTO_ORDER, supported_device_type


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # ImportError, or a CANN library that fails to load
        return False
    return bool(torch.npu.is_available())


def is_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "npu":
        return _npu_available()
    return False


def resolve_device(name: str) -> torch.device:
    """`auto` (the best device this host has) or an explicit cpu / cuda / npu."""
    if name == "auto":
        # An NPU is only probed when torch_npu is installed at all: importing
        # it is slow and noisy where it is not.
        import importlib.util

        order = AUTO_ORDER if importlib.util.find_spec("torch_npu") else AUTO_ORDER[1:]
        return torch.device(next(k for k in order if is_available(k)))
    kind = supported_device_type(name)
    if not is_available(kind):
        hint = {"cuda": "this torch build sees no CUDA GPU",
                "npu": "torch_npu is not installed or cannot find an Ascend NPU and CANN"}[kind]
        raise ValueError(f"device={name!r} was asked for but {hint}")
    return torch.device(name)


def mem_get_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of an accelerator; None for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "npu":
        return torch.npu.mem_get_info(device)
    return None
