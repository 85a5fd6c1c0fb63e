"""The OpenAI-compatible server (vLLM's `vllm.entrypoints.openai`).

Run it with `aotllm serve MODEL` or
`python -m aotllm.runtime.entrypoints.openai.api_server --model MODEL`.
fastapi, uvicorn and pydantic are imported only by these modules.
"""
