"""Rotary-embedding frequencies for every rope type transformers knows."""

from __future__ import annotations

import torch

from aotllm.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] float32, attention_scaling)."""
    params = dict(config.hf_config.get("rope_parameters") or {})
    if not params:  # transformers 4.x layout
        params = dict(config.hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.hf_config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = float(params.get("rope_theta", 10000.0))
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base**exponents), 1.0
    if rope_type == "dynamic":
        raise ValueError(
            "rope type 'dynamic' rescales frequencies with the sequence length at run "
            "time, which a static graph cannot do; use a checkpoint with 'linear', "
            "'llama3' or 'yarn' rope scaling, or remove rope_scaling from config.json"
        )
    # Reuse transformers' own implementation so scaled variants match it exactly.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"unknown rope type {rope_type!r}; transformers knows "
            f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config_object(), "cpu")
    return inv_freq.float(), float(scaling)
