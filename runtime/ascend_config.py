"""vllm-ascend's `additional_config={"torchair_graph_config": {...}}`, mapped onto
aotllm's bucket plan, backend and compile cache.

vllm-ascend (up to v0.11) turned on its TorchAir GE graph mode with this
dict. The same dict here selects `--backend ge`: `graph_batch_sizes` become
the decode batch buckets (a batch pads up to the next size, and the largest
caps max_num_seqs, as there), `graph_batch_sizes_init` keeps aotllm's own
batch sizes, and `use_cached_graph` reuses the compiled artifact across
starts. The KV-cache size is always part of the cached graphs' key here, so
`use_cached_kv_cache_bytes` needs no separate store. The validation rules
are vllm-ascend's; options aotllm does not implement are refused rather than
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KNOWN = {"enabled", "use_cached_graph", "graph_batch_sizes", "graph_batch_sizes_init",
          "use_cached_kv_cache_bytes"}
# Accepted only at these values: the DeepSeek MLA/MoE streams and NZ-format KV
# caches are not implemented, and aotllm's GE graphs always freeze their
# weights and keep torchair's view optimisation.
_FIXED = {"enable_multistream_mla": False, "enable_multistream_moe": False,
          "enable_kv_nz": False, "enable_super_kernel": False,
          "enable_view_optimize": True, "enable_frozen_parameter": True}


@dataclass(frozen=True)
class TorchairGraphConfig:
    enabled: bool = False
    use_cached_graph: bool = False
    graph_batch_sizes: tuple[int, ...] = ()
    graph_batch_sizes_init: bool = False
    use_cached_kv_cache_bytes: bool = False

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None,
                               enforce_eager: bool = False) -> "TorchairGraphConfig":
        if additional_config is None:
            return cls()
        if not isinstance(additional_config, dict):
            raise TypeError("additional_config must be a dict, e.g. "
                            "{'torchair_graph_config': {'enabled': True}}")
        other = sorted(set(additional_config) - {"torchair_graph_config", "refresh"})
        if other:
            raise ValueError(f"additional_config keys {other} are not supported by aotllm "
                             "(it reads torchair_graph_config)")
        raw = additional_config.get("torchair_graph_config", {})
        if not isinstance(raw, dict):
            raise TypeError("torchair_graph_config must be a dict")
        unknown = sorted(set(raw) - _KNOWN - set(_FIXED))
        if unknown:
            raise ValueError(f"unknown torchair_graph_config keys {unknown}; known: "
                             f"{', '.join(sorted(_KNOWN))}")
        for key, value in _FIXED.items():
            if raw.get(key, value) != value:
                raise ValueError(f"torchair_graph_config.{key}={raw[key]!r} is not supported "
                                 "by aotllm; leave it unset")
        sizes = raw.get("graph_batch_sizes", [])
        if not isinstance(sizes, list) or not all(type(s) is int for s in sizes):
            raise TypeError("graph_batch_sizes must be list[int]")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"graph_batch_sizes must be positive, got {sizes}")
        cfg = cls(
            enabled=bool(raw.get("enabled", False)),
            use_cached_graph=bool(raw.get("use_cached_graph", False)),
            graph_batch_sizes=tuple(sorted(set(sizes))),
            graph_batch_sizes_init=bool(raw.get("graph_batch_sizes_init", False)),
            use_cached_kv_cache_bytes=bool(raw.get("use_cached_kv_cache_bytes", False)),
        )
        cfg._validate(enforce_eager)
        return cfg

    def _validate(self, enforce_eager: bool) -> None:
        if self.graph_batch_sizes_init and self.graph_batch_sizes:
            raise ValueError("graph_batch_sizes_init is only valid when graph_batch_sizes "
                             "is empty")
        if not self.enabled:
            for name in ("use_cached_graph", "use_cached_kv_cache_bytes",
                         "graph_batch_sizes", "graph_batch_sizes_init"):
                if getattr(self, name):
                    raise ValueError(f"{name} is valid only when Torchair graph mode is "
                                     "enabled (torchair_graph_config.enabled=True)")
            return
        if self.use_cached_kv_cache_bytes and not self.use_cached_graph:
            raise ValueError("use_cached_kv_cache_bytes is valid only when use_cached_graph "
                             "is enabled")
        if enforce_eager:
            raise ValueError("Torchair graph mode and enforce_eager=True cannot be used "
                             "together; set enforce_eager=False for NPU graph mode")

    def max_num_seqs(self, requested: int) -> int:
        """The scheduler's batch cap: the largest graph batch size when given."""
        return max(self.graph_batch_sizes) if self.graph_batch_sizes else requested
