"""Device names: the one home of this fact (stdlib only).

An artifact is compiled for one device type and served on it. NPU means a
Huawei Ascend NPU through torch_npu; its collective backend is HCCL, as NCCL
is CUDA's and gloo the CPU's.
"""

from __future__ import annotations

DEVICE_TYPES = ("cpu", "cuda", "npu")
# `auto` picks the first of these the host has.
AUTO_ORDER = ("npu", "cuda", "cpu")
DISTRIBUTED_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def device_type(device: str) -> str:
    """"cuda:1" -> "cuda" (any name; see `supported_device_type`)."""
    return device.strip().split(":", 1)[0].lower()


def supported_device_type(device: str) -> str:
    """`device_type`, or ValueError for a device aotllm does not serve on."""
    kind = device_type(device)
    if kind not in DEVICE_TYPES:
        raise ValueError(
            f"device {device!r} is not supported; use one of: {', '.join(DEVICE_TYPES)}"
        )
    return kind
