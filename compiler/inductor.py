"""AOTInductor backend (CPU and CUDA): one .pt2 package per bucket, without weights."""

from __future__ import annotations

from pathlib import Path

import torch

from aotllm.graphs.buckets import Bucket

# Constants (weights) stay out of the package; the runtime binds the one
# shared copy from weights.safetensors to every graph with user_managed=True.
# emulate_precision_casts: round bf16/fp16 intermediates where eager does
# instead of keeping fused chains in fp32. Without it a bf16 SmolLM2 artifact
# answered "What is the capital of France?" with another first token than
# eager and transformers (a near-tie of two logits flipped); with it, the same.
_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False,
                     "emulate_precision_casts": True}


class InductorBackend:
    name = "inductor"
    file_suffix = ".pt2"
    # models/int8_kernels.py: int8 extern kernels on CPU, the float route on CUDA.
    quantization_schemes = frozenset({"w8a16", "w8a8", "w8a8_static"})

    def __init__(self, device: str):
        self.device = torch.device(device)

    def version(self) -> str:
        return f"torch-{torch.__version__}"

    def compile_bucket(
        self, program: torch.export.ExportedProgram, bucket: Bucket, out_path: Path
    ) -> None:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(out_path), inductor_configs=dict(_INDUCTOR_CONFIGS)
        )
