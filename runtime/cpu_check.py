"""Does this CPU suit a CPU artifact? (the record of compiler/cpu_target.py)

Code generated for an ISA this CPU lacks would die on an illegal instruction:
refused here, with what to do. An artifact tuned for another CPU (its linear
kernels chosen for native BF16 where this one has none, or the reverse) runs
correctly, only not at its best: logged, with how to retune.
"""

from __future__ import annotations

import logging

import torch

from aotllm.graphs.manifest import ArtifactError, Manifest
from aotllm.models import cpu_isa

logger = logging.getLogger(__name__)

# Names in Inductor's vector-ISA string -> whether this CPU executes them.
_HAS = {
    "avx2": lambda: torch.cpu._is_avx2_supported(),
    "avx512": lambda: torch.cpu._is_avx512_supported(),
    "avx512_vnni": lambda: torch.cpu._is_vnni_supported(),
    "amx_tile": lambda: torch.cpu._is_amx_tile_supported(),
    "amx_fp16": lambda: torch.cpu._is_amx_fp16_supported(),
}
_RESTRICT = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"


def check_cpu(manifest: Manifest) -> None:
    record = manifest.extra.get("cpu")
    if manifest.device != "cpu" or not record:
        return  # not a CPU artifact, or one from before the record existed
    vec = record.get("inductor_vec_isa")
    missing = [name for name in (vec or "").split() if name in _HAS and not _HAS[name]()]
    if missing:
        raise ArtifactError(
            f"this artifact's graphs were compiled for {vec} CPUs, and this CPU has no "
            f"{', '.join(missing)}: recompile it on this machine, or compile a portable "
            f"artifact with the ISA restricted (`{_RESTRICT} aotllm compile ...`)")
    built = cpu_isa.CpuIsa.from_dict(record["isa"])
    here = cpu_isa.detect()
    if built != here:
        logger.warning(
            "This artifact was tuned for a %s CPU and runs on %s: its results are the same, "
            "but its kernels were not chosen for this CPU. Recompile it here for the best "
            "speed.", built.describe(), here.describe())
