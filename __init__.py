"""aotllm: ahead-of-time compiled LLM inference with a vLLM-compatible API.

`from aotllm import LLM, SamplingParams` works as in vLLM. The heavy modules
(torch, transformers) are imported on first use, so `import aotllm.graphs`
stays light for tools that only read artifacts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "aotllm.llm",
    "SamplingParams": "aotllm.runtime.sampling_params",
    "RequestOutput": "aotllm.runtime.outputs",
    "CompletionOutput": "aotllm.runtime.outputs",
    "Logprob": "aotllm.runtime.outputs",
    "LLMEngine": "aotllm.runtime.engine",
    "EngineArgs": "aotllm.runtime.engine_args",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from aotllm.runtime.engine import LLMEngine
    from aotllm.runtime.engine_args import EngineArgs
    from aotllm.llm import LLM
    from aotllm.runtime.outputs import CompletionOutput, Logprob, RequestOutput
    from aotllm.runtime.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aotllm' has no attribute {name!r}")
