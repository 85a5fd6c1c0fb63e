"""EngineArgs: the engine's options under vLLM's names, and the configs they derive."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class EngineArgs:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    # vLLM defaults to 256; every decode batch size is a graph compiled ahead
    # of time here, so the default stays small. Raise it for serving.
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    block_size: int = 16
    enforce_eager: bool = False
    # vLLM v1's default: full KV blocks are shared across requests by the
    # hash of their token prefix (runtime/block_manager.py).
    enable_prefix_caching: bool = True
    device: str = "auto"
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    disable_log_stats: bool = True
    # vLLM's `quantization`: a scheme of quantize/config.py (w8a16, w8a8,
    # w8a8_static) applied when a checkpoint is compiled or run eagerly.
    quantization: str | None = None
    # vLLM's plugin options; aotllm reads vllm-ascend's torchair_graph_config
    # (runtime/ascend_config.py), which selects the GE backend.
    additional_config: dict | None = None
    # vLLM's `generation_config`: "auto" takes the model's recommended
    # sampling defaults from its generation_config.json, "vllm" ignores them,
    # a directory reads its generation_config.json instead.
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        from aotllm.quantize.config import resolve_scheme

        object.__setattr__(self, "quantization", resolve_scheme(self.quantization))
        self.torchair_graph_config()  # validates, with vllm-ascend's rules
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")

    def torchair_graph_config(self):
        from aotllm.runtime.ascend_config import TorchairGraphConfig

        return TorchairGraphConfig.from_additional_config(self.additional_config,
                                                          self.enforce_eager)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unsupported engine argument(s): {', '.join(unknown)}. "
                f"Supported: {', '.join(sorted(known - {'model'}))}"
            )
        return cls(model=model, **kwargs)

    def resolve_device(self) -> torch.device:
        from aotllm.runtime.devices import resolve_device

        return resolve_device(self.device)
