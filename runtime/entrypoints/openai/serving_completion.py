"""POST /v1/completions: one engine request per prompt, `n` choices each."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.entrypoints.openai.logprobs import CompletionLogprobs
from aotllm.runtime.entrypoints.openai.protocol import CompletionRequest, OpenAIError
from aotllm.runtime.entrypoints.openai.serving_engine import OpenAIServing, now, random_id, usage
from aotllm.runtime.entrypoints.openai.streams import SSE_DONE, merge, sse

logger = logging.getLogger(__name__)


class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per prompt, whatever form the request used."""
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode(p)))
            else:
                out.append((None, list(p)))
        return out

    async def create(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        model = self.check_model(req.model)
        req.refuse_unsupported({"suffix": "", "logit_bias": {}})
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("stream_options can only be set when stream is true",
                              param="stream_options")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("echo with logprobs needs prompt logprobs, which this server does "
                              "not compute yet; drop one of them", param="echo")
        prompts = self._prompts(req.prompt)
        request_id = random_id("cmpl")
        gens, prompt_lens = [], []
        try:
            for i, (text, ids) in enumerate(prompts):
                self.check_prompt_len(len(ids))
                params = self.sampling_params(req, req.max_tokens, req.logprobs, len(ids))
                prompt = {"prompt": text, "prompt_token_ids": ids}
                gens.append(await self.generate(f"{request_id}-{i}", prompt, params))
                prompt_lens.append(len(ids))
        except BaseException:
            # A later prompt was refused: the ones already queued must not run.
            self.engine.abort([f"{request_id}-{i}" for i in range(len(gens))])
            raise
        if self.log_requests:
            logger.info("completion %s: %d prompt(s), %s tokens, n=%d, user=%s", request_id,
                        len(prompts), prompt_lens, req.n, req.user)
        echoes = [self._echo_text(text, ids) if req.echo else "" for text, ids in prompts]
        if req.stream:
            return self._stream(req, request_id, model, gens, prompt_lens, echoes)
        return await self._full(req, request_id, model, gens, prompt_lens, echoes)

    def _echo_text(self, text: str | None, ids: list[int]) -> str:
        return text if text is not None else self.tokenizer.decode(ids)

    async def _full(self, req, request_id, model, gens, prompt_lens, echoes) -> dict[str, Any]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in merge(gens):
            finals[i] = out
        choices, completion_tokens = [], 0
        for i in range(len(gens)):
            for c in finals[i].outputs:
                completion_tokens += len(c.token_ids)
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs(self.tokenizer).build(c.token_ids, c.logprobs)
                choices.append({
                    "index": i * req.n + c.index, "text": echoes[i] + c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                })
        choices.sort(key=lambda c: c["index"])
        return {"id": request_id, "object": "text_completion", "created": now(),
                "model": model, "choices": choices,
                "usage": usage(sum(prompt_lens), completion_tokens,
                               self.cached_tokens(finals.values()))}

    async def _stream(self, req, request_id, model, gens, prompt_lens,
                      echoes) -> AsyncIterator[str]:
        created = now()
        completion_tokens = 0
        logprobs: dict[int, CompletionLogprobs] = {}
        echoed: set[int] = set()
        opts = req.stream_options
        latest: dict[int, RequestOutput] = {}

        def usage_now() -> dict[str, Any]:
            return usage(sum(prompt_lens), completion_tokens,
                         self.cached_tokens(latest.values()))

        def running_usage() -> dict[str, Any]:
            # vLLM's continuous_usage_stats: the usage so far on every chunk.
            if opts and opts.include_usage and opts.continuous_usage_stats:
                return {"usage": usage_now()}
            return {}

        def chunk(choices: list[dict[str, Any]], **extra) -> str:
            return sse({"id": request_id, "object": "text_completion", "created": created,
                        "model": model, "choices": choices, **extra})

        try:
            async for i, out in merge(gens):
                latest[i] = out
                choices = []
                for c in out.outputs:
                    index = i * req.n + c.index
                    completion_tokens += len(c.token_ids)
                    text = c.text
                    if echoes[i] and index not in echoed:
                        echoed.add(index)
                        text = echoes[i] + text
                    if not text and not c.token_ids and c.finish_reason is None:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        acc = logprobs.setdefault(index, CompletionLogprobs(self.tokenizer))
                        lp = acc.build(c.token_ids, c.logprobs or [])
                    choices.append({"index": index, "text": text, "logprobs": lp,
                                    "finish_reason": c.finish_reason,
                                    "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices, **running_usage())
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage_now())
        except OpenAIError as e:
            yield sse(e.body())
        except Exception as e:  # the engine died mid-stream: say so, never a traceback
            logger.error("completion %s failed mid-stream: %s", request_id, e)
            yield sse(OpenAIError(f"the request failed: {type(e).__name__}",
                                  status=503).body())
        yield SSE_DONE
