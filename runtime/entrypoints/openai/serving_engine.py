"""What completions and chat share: the model name check, request to
SamplingParams, the context-length check, engine errors to HTTP statuses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from aotllm.runtime.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from aotllm.runtime.entrypoints.openai.protocol import MAX_LOGPROBS, OpenAIError, SamplingFields


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str],
                 log_requests: bool = True, enable_prompt_tokens_details: bool = False) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.log_requests = log_requests
        self.enable_prompt_tokens_details = enable_prompt_tokens_details
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        # The model's generation-config defaults for fields a request leaves unset.
        self.default_sampling = engine.engine.default_sampling

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a model this server does not serve."""
        if name is None:
            return self.model_name
        if name not in self.served_model_names:
            raise OpenAIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND,
                              param="model", code="model_not_found")
        return name

    def cached_tokens(self, outputs) -> int | None:
        """Prompt tokens the prefix cache served, summed over the prompts'
        latest outputs; None unless the usage is to report them."""
        if not self.enable_prompt_tokens_details:
            return None
        return sum(out.num_cached_tokens or 0 for out in outputs)

    def check_prompt_len(self, prompt_len: int) -> None:
        if prompt_len > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {prompt_len} tokens. Shorten the prompt.", param="prompt")
        if prompt_len == 0:
            raise OpenAIError("the prompt is empty: send at least one token", param="prompt")

    def sampling_params(self, req: SamplingFields, max_tokens: int | None,
                        logprobs: int | None, prompt_len: int) -> SamplingParams:
        """The request's SamplingParams; every invalid value becomes a 400."""
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError("best_of is not supported; leave it out or equal to n",
                              param="best_of")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}",
                              param="logprobs")
        if max_tokens is None and "max_tokens" in self.default_sampling:
            max_tokens = min(self.default_sampling["max_tokens"], self.max_model_len - prompt_len)
        if max_tokens is not None and max_tokens + prompt_len > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {max_tokens + prompt_len} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} in the completion). Reduce the prompt or max_tokens.",
                param="max_tokens")
        kwargs: dict[str, Any] = dict(
            n=req.n, seed=req.seed, stop=req.stop, max_tokens=max_tokens, logprobs=logprobs,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop_token_ids=req.stop_token_ids, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )
        # Unset means the model's generation-config default if it has one,
        # else the SamplingParams default (OpenAI's defaults are the same).
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(req, name)
            if value is None:
                value = self.default_sampling.get(name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e)) from None

    async def generate(self, request_id: str, prompt: dict[str, Any],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's outputs; engine refusals become OpenAIErrors before the
        first output, so a streaming response never starts with an error."""
        try:
            stream = self.engine.add_request(request_id, prompt, params)
        except QueueFullError as e:
            raise OpenAIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
        except EngineDeadError as e:
            raise OpenAIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e)) from None
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream) -> AsyncIterator[RequestOutput]:
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:  # the client went away (or shutdown): free its blocks
                self.engine.abort(request_id)


def usage(prompt_tokens: int, completion_tokens: int,
          cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` (prompt tokens served from the
    prefix cache) only when the server was started with
    --enable-prompt-tokens-details, as vLLM does."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                           "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def now() -> int:
    return int(time.time())
