"""What this CPU can do for the linears, as torch and oneDNN will use it.

The hardware flags (torch.cpu's probes, /proc/cpuinfo) say what the silicon
has; two environment variables restrict what the libraries use, and both are
how a user (or a test) runs the AVX2 path on a newer CPU:

- ATEN_CPU_CAPABILITY (default, avx2, avx512): ATen's and Inductor's vector
  code (Inductor picks its vector ISA from the same capability);
- ONEDNN_MAX_CPU_ISA (AVX2, AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX,
  ...; DNNL_MAX_CPU_ISA is its older name): oneDNN's GEMMs, the kernels that
  run bf16 and fp16 matmuls on CPU.

A "native" BF16 (FP16) matmul needs the instructions and a oneDNN allowed to
use them. Without them oneDNN's BF16 GEMM is compute bound at a fraction of
FP32 speed (../shared/CPU-KERNELS.md), which is what the kernel choice of
`models/ops.py` works around.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

# oneDNN's ISA names, lowest first; a cap admits itself and everything before it.
_ONEDNN_ORDER = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
    "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16",
)


@dataclass(frozen=True)
class CpuIsa:
    capability: str  # ATen's: DEFAULT, AVX2, AVX512 (after ATEN_CPU_CAPABILITY)
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA as set, None when unrestricted
    native_bf16: bool  # BF16 dot products (AVX512_BF16 or AMX) that oneDNN may use
    native_fp16: bool  # FP16 arithmetic (AVX512_FP16 or AMX_FP16) that oneDNN may use
    int8_dot: bool  # VNNI or AMX int8 that oneDNN may use

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CpuIsa":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def native_for(self, dtype: torch.dtype) -> bool:
        """Whether matmuls in `dtype` run on native instructions here."""
        if dtype == torch.bfloat16:
            return self.native_bf16
        if dtype == torch.float16:
            return self.native_fp16
        return True  # float32

    def describe(self) -> str:
        extras = [name for name, on in (("bf16", self.native_bf16), ("fp16", self.native_fp16),
                                        ("int8-dot", self.int8_dot)) if on]
        cap = f" (oneDNN capped at {self.onednn_max_isa})" if self.onednn_max_isa else ""
        return f"{self.capability}{' + ' + ', '.join(extras) if extras else ''}{cap}"


def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _onednn_allows(cap: str | None, isa: str) -> bool:
    if cap is None or cap in ("ALL", "DEFAULT"):
        return True
    if cap not in _ONEDNN_ORDER:
        return True  # a name this table does not know: assume no restriction
    return _ONEDNN_ORDER.index(isa) <= _ONEDNN_ORDER.index(cap)


@functools.cache
def l2_cache_bytes() -> int:
    """Per-core L2 size from sysfs (2 MiB on Sapphire Rapids, 512 KiB on Zen 3);
    1 MiB where the kernel does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(root)):
            with open(f"{root}/{index}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{root}/{index}/size") as f:
                size = f.read().strip().upper()
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        pass
    return 1 << 20


@functools.cache
def detect() -> CpuIsa:
    """This process's view of the CPU (read once: the environment variables
    take effect at library load, so they cannot change later either)."""
    cap_env = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
               or None)
    cap = cap_env.upper() if cap_env else None
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpuinfo_flags()
    # The matmuls are oneDNN's, so ATen's capability does not gate these.
    bf16 = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) and (
        _onednn_allows(cap, "AVX512_CORE_BF16"))
    fp16 = ("avx512_fp16" in flags or torch.cpu._is_amx_fp16_supported()) and (
        _onednn_allows(cap, "AVX512_CORE_FP16"))
    int8 = torch.cpu._is_vnni_supported() and (
        _onednn_allows(cap, "AVX512_CORE_VNNI") or (
            "avx_vnni" in flags and _onednn_allows(cap, "AVX2_VNNI")))
    return CpuIsa(capability, cap, bool(bf16), bool(fp16), bool(int8))
