"""The OpenAI-compatible server (vLLM's `vllm.entrypoints.openai`).

Run it with `aotllm serve MODEL` or
`python -m aotllm.entrypoints.openai.api_server --model MODEL` (vLLM's module path,
an alias of this package's api_server).
fastapi, uvicorn and pydantic are imported only by these modules.
"""
