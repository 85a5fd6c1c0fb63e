"""vLLM's module path for the server, `python -m aotllm.entrypoints.openai.api_server`.

The server lives in runtime/entrypoints/ (it is part of the runtime: it never
imports the compiler); this package only gives vLLM users the spelling they
already type.
"""
