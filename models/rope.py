"""Rotary-embedding frequencies for every rope type transformers knows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aotllm.models.config import ModelConfig


@dataclass(frozen=True)
class DynamicNTK:
    """'dynamic' rope scaling: past max_position_embeddings the base grows with
    the sequence length. A static graph still handles it, because the length
    of each row is a graph input (context_lens): the frequencies are computed
    per row inside the graph, as transformers recomputes them per forward."""

    base: float
    factor: float
    max_position_embeddings: int
    dim: int  # rotary dims

    def inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[B] lengths -> [B, dim // 2] frequencies (transformers' formula)."""
        n = torch.clamp(seq_lens.float(), min=float(self.max_position_embeddings))
        base = self.base * (self.factor * n / self.max_position_embeddings
                            - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, device=seq_lens.device).float() / self.dim
        return 1.0 / (base.unsqueeze(-1) ** exponents)


def rotary_dim(config: ModelConfig) -> int:
    return config.rotary_dim or config.head_dim


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float, DynamicNTK | None]:
    """(inv_freq [rotary_dim // 2] float32, attention_scaling, dynamic scaling or None)."""
    params = config.rope_parameters
    rope_type = params["rope_type"]
    dim = rotary_dim(config)
    base = float(params.get("rope_theta", 10000.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope_type == "default":
        return 1.0 / (base**exponents), 1.0, None
    if rope_type == "dynamic":
        dynamic = DynamicNTK(base, float(params.get("factor", 1.0)),
                             config.max_position_embeddings, dim)
        return 1.0 / (base**exponents), 1.0, dynamic
    if dim != config.head_dim:
        raise ValueError(
            f"rope type {rope_type!r} with partial rotary ({dim} of {config.head_dim} dims) "
            "is not supported; aotllm supports 'default' and 'dynamic' rope there"
        )
    # Reuse transformers' own implementation so scaled variants match it exactly.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"unknown rope type {rope_type!r}; transformers knows "
            f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config_object(), "cpu")
    return inv_freq.float(), float(scaling), None
