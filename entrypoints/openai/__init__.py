"""Alias of aotllm.runtime.entrypoints.openai under vLLM's module path."""
