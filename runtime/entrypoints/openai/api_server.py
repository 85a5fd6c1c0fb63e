"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLM.

    python -m aotllm.entrypoints.openai.api_server --model ./artifact --port 8000
    aotllm serve ./artifact --port 8000

Every error a client can cause is answered in the OpenAI error body
({"error": {"message", "type", "param", "code"}}): 400 for any invalid
request (malformed JSON and wrong types included, where FastAPI would say
422), 401 without the API key, 404 for an unknown model or route, 413 for a
body over the limit, 503 when the waiting queue is full or the engine is
down. Unexpected failures are logged here and answered with a bare 500;
a traceback never reaches the client.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import sys
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import aotllm
from aotllm.runtime.async_engine import AsyncLLM
from aotllm.runtime.entrypoints.openai.cli_args import engine_kwargs, make_arg_parser
from aotllm.runtime.entrypoints.openai.metrics import ServerMetrics
from aotllm.runtime.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, OpenAIError, TokenizeRequest,
    describe_validation_error)
from aotllm.runtime.entrypoints.openai.serving_completion import OpenAIServingCompletion
from aotllm.runtime.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("aotllm.server")

# Routes that need the API key when one is set.
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which buffers streams): checks the bearer token."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" \
                and scope["path"].startswith(PROTECTED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Constant time: how much of the key matched must not leak through timing.
            if not hmac.compare_digest(given, self.expected):
                err = OpenAIError("invalid or missing API key: send 'Authorization: Bearer "
                                  "<key>'", HTTPStatus.UNAUTHORIZED, code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise OpenAIError("the Content-Length header is not a number")
        if int(declared) > limit:
            raise OpenAIError(f"request body of {declared} bytes is over the server's limit of "
                              f"{limit} bytes (--max-request-body-bytes)",
                              HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(f"request body is over the server's limit of {limit} bytes "
                              "(--max-request-body-bytes)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model, limit: int):
    body = await read_body(request, limit)
    if not body.strip():
        raise OpenAIError("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        message, param = describe_validation_error(e)
        raise OpenAIError(message, param=param) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, coro):
    """Runs a non-streaming handler; a client that hangs up cancels it, and the
    cancellation aborts its engine requests (their blocks are freed)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


def build_app(args: argparse.Namespace, engine: AsyncLLM, metrics: ServerMetrics | None,
              served_model_names: list[str]) -> FastAPI:
    log_requests = not args.disable_log_requests
    details = args.enable_prompt_tokens_details
    completion = OpenAIServingCompletion(engine, served_model_names, log_requests, details)
    chat = OpenAIServingTokenization(engine, served_model_names, log_requests, details)
    limit = args.max_request_body_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # After uvicorn's graceful shutdown: abort whatever is still running.
            await engine.shutdown()

    app = FastAPI(title="aotllm OpenAI-compatible server", version=aotllm.__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=int(exc.status))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = OpenAIError(str(exc.detail), HTTPStatus(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(exc)
        return JSONResponse(OpenAIError(message, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        err = OpenAIError("internal server error", HTTPStatus.INTERNAL_SERVER_ERROR)
        return JSONResponse(err.body(), status_code=500)

    async def respond(request: Request, result_coro, stream: bool) -> Response:
        if stream:
            # Refusals raise before the first byte, so they still get a status.
            gen = await result_coro
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await cancel_on_disconnect(request, result_coro)
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest, limit)
        return await respond(request, completion.create(req), req.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest, limit)
        return await respond(request, chat.create(req), req.stream)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "aotllm",
             "root": args.model, "parent": None, "max_model_len": chat.max_model_len}
            for name in served_model_names]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return chat.tokenize(await parse(request, TokenizeRequest, limit))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return chat.detokenize(await parse(request, DetokenizeRequest, limit))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            err = OpenAIError("the engine is not running", HTTPStatus.SERVICE_UNAVAILABLE)
            return JSONResponse(err.body(), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": aotllm.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            raise OpenAIError("metrics are disabled", HTTPStatus.NOT_FOUND)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/debug/kv")
    async def debug_kv():
        # Read across threads without a lock: each figure is a len() or two, so
        # a step in flight may skew them by a block, never corrupt them.
        stats = engine.engine.scheduler_stats()
        return {"num_blocks": stats.num_blocks, "num_free_blocks": stats.num_free_blocks,
                "num_used_blocks": stats.num_blocks - stats.num_free_blocks,
                # Free blocks that still hold a cached prefix: evictable, not leaked.
                "num_cached_free_blocks": stats.num_cached_free_blocks,
                "prefix_cache_queries": stats.prefix_cache_queries,
                "prefix_cache_hits": stats.prefix_cache_hits,
                "num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "num_unfinished_requests": engine.engine.get_num_unfinished_requests()}

    return app


def build_async_engine(args: argparse.Namespace) -> tuple[AsyncLLM, ServerMetrics, list[str]]:
    # The checkpoint-to-artifact step (compile into the cache) is the entry
    # point's, as for `LLM`; serving an artifact never imports the compiler.
    from aotllm.llm import resolve_model
    from aotllm.runtime.engine import LLMEngine
    from aotllm.runtime.engine_args import EngineArgs

    engine_args = resolve_model(EngineArgs.from_kwargs(str(args.model), **engine_kwargs(args)))
    llm_engine = LLMEngine.from_engine_args(engine_args)
    names = args.served_model_name or [str(args.model)]
    metrics = ServerMetrics(names[0])
    engine = AsyncLLM(llm_engine, args.max_waiting_requests, stats_callback=metrics.on_step)
    return engine, metrics, names


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    engine, metrics, names = build_async_engine(args)
    app = build_app(args, engine, metrics, names)
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn turns SIGTERM into a graceful shutdown, then re-raises the signal
    # under the handler it found. By then every request has finished or been
    # aborted, so that handler must not kill the process (exit code 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    logger.info("serving %s as %s on http://%s:%d", args.model, ", ".join(names), args.host,
                args.port)
    server.run()
    return 0 if server.started else 1  # not started: the port was taken, or startup failed


def main(argv: list[str] | None = None) -> int:
    from aotllm.cli import run_parsed

    parser = make_arg_parser()
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error
        return e.code if isinstance(e.code, int) else 2
    args.func = run_server
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
