"""LLMEngine: vLLM's add_request / step / abort_request over the engine core.

Three parts, each usable on its own: `process_inputs` turns a prompt into a
validated `EngineRequest` (tokenized; thread-safe, touches no engine state),
the `EngineCore` schedules and runs the model, and the `OutputProcessor`
turns sampled tokens into text and `RequestOutput`s. `LLM` drives this engine
directly; the async server (runtime/async_engine.py) calls `process_inputs`
on its event loop and everything else on its engine thread. `n > 1` fans out
into one child request per sample (as vLLM V1 does) and is reported as one
output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aotllm.runtime.engine_core import EngineCore, SchedulerStats
from aotllm.runtime.model_runner import ModelRunner
from aotllm.runtime.output_processor import IterationStats, OutputProcessor
from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.request import Request, RequestStatus
from aotllm.runtime.sampling_params import SamplingParams
from aotllm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed validation, ready for `add_processed_request`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        vocab_size: int,
        default_sampling: dict[str, Any] | None = None,
    ):
        self.engine_core = EngineCore(runner, scheduler)
        self.output_processor = OutputProcessor(tokenizer)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        # SamplingParams fields the model's generation config sets
        # (runtime/generation_config.py): the defaults of unset request fields.
        self.default_sampling = dict(default_sampling or {})
        # The last step's figures, for whoever exports metrics.
        self.last_iteration_stats: IterationStats | None = None

    @classmethod
    def from_engine_args(cls, args) -> "LLMEngine":
        from aotllm.runtime.loader import build_engine

        return build_engine(args)

    @property
    def runner(self) -> ModelRunner:
        return self.engine_core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.engine_core.scheduler

    # -- inputs (thread-safe) -----------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(
                "a dict prompt needs 'prompt' (text) or 'prompt_token_ids' (a list of ints)"
            )
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(
            f"prompt must be a string, a list of token ids, or a dict with 'prompt' or "
            f"'prompt_token_ids'; got {type(prompt).__name__}"
        )

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("The decoder prompt cannot be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"Token id {bad[0]} is out of vocabulary (the model has {self.vocab_size} tokens)"
            )
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(token_ids)}) is longer than the maximum "
                f"model length of {self.max_model_len}. Make sure that `max_model_len` is no "
                "smaller than the number of text tokens, or shorten the prompt."
            )

    def process_inputs(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> EngineRequest:
        """Tokenizes and validates; raises ValueError / TypeError for bad input."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet; leave it as None")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        arrival_time = time.time() if arrival_time is None else arrival_time
        return EngineRequest(request_id, text, token_ids, params, arrival_time)

    # -- requests (the engine's thread) ---------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.add_processed_request(self.process_inputs(request_id, prompt, params, arrival_time))

    def add_processed_request(self, request: EngineRequest) -> None:
        rid, params = request.request_id, request.params
        if self.output_processor.has_request(rid):
            raise ValueError(f"request id {rid!r} is already in use")
        child_ids = [rid] if params.n == 1 else [f"{i}_{rid}" for i in range(params.n)]
        self.output_processor.add_request(rid, request.prompt, request.prompt_token_ids, params,
                                          child_ids, request.arrival_time)
        for i, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:
                # Each sample of a seeded request gets its own stream, as in vLLM.
                child_params = params.clone(seed=params.seed + i)
            self.engine_core.add_request(Request(
                request_id=child_id,
                prompt_token_ids=list(request.prompt_token_ids),
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=request.arrival_time,
            ))

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Aborts requests at once (their KV blocks are freed); returns their
        final outputs (finish_reason "abort"). Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids, outputs = self.output_processor.abort_requests(ids, time.time())
        self.engine_core.abort_requests(child_ids)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix no request holds; False when caching is off."""
        self.scheduler.block_manager.reset_prefix_cache()
        return self.scheduler.enable_prefix_caching

    def scheduler_stats(self) -> SchedulerStats:
        return self.engine_core.stats()

    # -- the step loop ------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the outputs of requests that got new tokens
        (cumulative unless a request's output_kind says otherwise)."""
        core_outputs = self.engine_core.step()
        processed = self.output_processor.process_outputs(core_outputs)
        # A stop string ends the request now, freeing its blocks before the
        # next schedule.
        self.engine_core.finish_requests(processed.reqs_to_stop, RequestStatus.FINISHED_STOPPED)
        self.last_iteration_stats = processed.stats
        return processed.request_outputs
