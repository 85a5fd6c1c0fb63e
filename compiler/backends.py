"""The compiler backend interface: compile one bucket, write its graph file.

A backend turns one exported bucket into one file under the artifact's
graphs/ directory. The runtime has a matching loader per backend name; the
two halves share nothing but the file and the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from aotllm.graphs.buckets import Bucket


class GraphBackend(Protocol):
    name: str
    file_suffix: str
    # Quantization schemes whose linears this backend has kernels for.
    quantization_schemes: frozenset[str]

    def version(self) -> str:
        """Recorded in the manifest and in every bucket's reuse key."""
        ...

    def compile_bucket(
        self, program: torch.export.ExportedProgram, bucket: Bucket, out_path: Path
    ) -> None:
        """Compile `program` (the model at `bucket`'s shapes) into `out_path`.

        The file must not carry the weights: they are stored once per
        artifact and bound to every graph at load time.
        """
        ...


def check_quantization(backend: GraphBackend, scheme: str | None) -> None:
    if scheme is not None and scheme not in backend.quantization_schemes:
        have = ", ".join(sorted(backend.quantization_schemes)) or "none"
        raise ValueError(
            f"the {backend.name} backend has no kernel for {scheme} linears (it has: {have}); "
            "choose one of those schemes or another --backend"
        )


def get_backend(name: str, device: str) -> GraphBackend:
    if name == "inductor":
        from aotllm.compiler.inductor import InductorBackend

        return InductorBackend(device)
    raise ValueError(f"unknown compiler backend {name!r}; available: inductor")
