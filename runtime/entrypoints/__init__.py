"""Entry points over the async engine: the OpenAI-compatible HTTP server."""
