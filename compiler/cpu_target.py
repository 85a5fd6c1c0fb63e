"""What a CPU artifact was tuned for: the CPU as this process sees it, the
vector ISA Inductor generates code for, and each bucket's linear kernel.

Recorded in the manifest (`extra["cpu"]`) and in every bucket's reuse key:
the generated code and the kernel choices are only right for the CPU they
were made on. The runtime compares the record with its own CPU
(runtime/cpu_check.py). To build for a smaller ISA than this machine's,
compile with it restricted: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`.
"""

from __future__ import annotations

import torch

from aotllm.graphs.buckets import Bucket
from aotllm.models import cpu_isa
from aotllm.models.float_kernels import float_linear_kernel


def inductor_vec_isa() -> str:
    """The vector ISA Inductor's C++ code is built for (follows ATEN_CPU_CAPABILITY)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "none"


def cpu_record(buckets: tuple[Bucket, ...], dtype: torch.dtype, inductor: bool) -> dict:
    """The manifest's `extra["cpu"]` for a CPU artifact."""
    record: dict = {"isa": cpu_isa.detect().to_dict()}
    if inductor:
        # Decoder-layer linears see batch x tokens rows (the LM head only the
        # batch: at prefill it may take another kernel than the body).
        record["inductor_vec_isa"] = inductor_vec_isa()
        record["linear_kernels"] = {
            b.name: float_linear_kernel(b.batch * b.tokens, dtype, torch.device("cpu"),
                                        compiled=True)
            for b in buckets}
    return record
