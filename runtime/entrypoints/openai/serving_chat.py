"""POST /v1/chat/completions: the chat template, then one engine request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aotllm.runtime.chat import apply_chat_template
from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.entrypoints.openai.logprobs import chat_logprobs
from aotllm.runtime.entrypoints.openai.protocol import ChatCompletionRequest, OpenAIError
from aotllm.runtime.entrypoints.openai.serving_engine import OpenAIServing, now, random_id, usage
from aotllm.runtime.entrypoints.openai.streams import SSE_DONE, sse

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    def render(self, messages, add_generation_prompt: bool, continue_final_message: bool,
               chat_template: str | None = None) -> tuple[str, list[int]]:
        try:
            return apply_chat_template(
                self.tokenizer, [m.model_dump(exclude_none=True) for m in messages],
                chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None

    async def create(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        model = self.check_model(req.model)
        req.refuse_unsupported({"tools": [], "tool_choice": "none", "logit_bias": {},
                                "response_format": {"type": "text"}, "echo": False})
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("stream_options can only be set when stream is true",
                              param="stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        text, ids = self.render(req.messages, req.add_generation_prompt,
                                req.continue_final_message, req.chat_template)
        self.check_prompt_len(len(ids))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs, len(ids))
        request_id = random_id("chatcmpl")
        gen = await self.generate(request_id, {"prompt": text, "prompt_token_ids": ids}, params)
        if self.log_requests:
            logger.info("chat %s: %d prompt tokens, n=%d, user=%s", request_id, len(ids),
                        req.n, req.user)
        if req.stream:
            return self._stream(req, request_id, model, gen, len(ids))
        return await self._full(req, request_id, model, gen, len(ids))

    async def _full(self, req, request_id, model, gen, prompt_len) -> dict[str, Any]:
        final: RequestOutput | None = None
        async for out in gen:
            final = out
        assert final is not None and final.finished
        choices, completion_tokens = [], 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            lp = None
            if req.logprobs:
                lp = chat_logprobs(self.tokenizer, c.token_ids, c.logprobs,
                                   req.top_logprobs or 0)
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            })
        return {"id": request_id, "object": "chat.completion", "created": now(),
                "model": model, "choices": choices,
                "usage": usage(prompt_len, completion_tokens, self.cached_tokens([final]))}

    async def _stream(self, req, request_id, model, gen, prompt_len) -> AsyncIterator[str]:
        created = now()

        def chunk(choices: list[dict[str, Any]], **extra) -> str:
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": choices, **extra})

        completion_tokens = 0
        opts = req.stream_options
        latest: list[RequestOutput] = []

        def usage_now() -> dict[str, Any]:
            return usage(prompt_len, completion_tokens, self.cached_tokens(latest))

        def running_usage() -> dict[str, Any]:
            # vLLM's continuous_usage_stats: the usage so far on every chunk.
            if opts and opts.include_usage and opts.continuous_usage_stats:
                return {"usage": usage_now()}
            return {}

        try:
            # The role comes first, once per choice, as OpenAI sends it.
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(req.n)])
            async for out in gen:
                latest[:] = [out]
                choices = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    lp = None
                    if req.logprobs:
                        lp = chat_logprobs(self.tokenizer, c.token_ids, c.logprobs or [],
                                           req.top_logprobs or 0)
                    delta = {"content": c.text} if c.text else {}
                    choices.append({"index": c.index, "delta": delta, "logprobs": lp,
                                    "finish_reason": c.finish_reason,
                                    "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices, **running_usage())
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage_now())
        except OpenAIError as e:
            yield sse(e.body())
        except Exception as e:  # the engine died mid-stream: say so, never a traceback
            logger.error("chat %s failed mid-stream: %s", request_id, e)
            yield sse(OpenAIError(f"the request failed: {type(e).__name__}", status=503).body())
        yield SSE_DONE
