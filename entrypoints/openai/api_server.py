"""`python -m aotllm.entrypoints.openai.api_server --model MODEL`, as with vLLM.

The server itself is aotllm.runtime.entrypoints.openai.api_server; this module
runs it under vLLM's module path.
"""

from aotllm.runtime.entrypoints.openai.api_server import main

if __name__ == "__main__":
    raise SystemExit(main())
