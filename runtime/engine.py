"""LLMEngine: the step loop under `LLM` (vLLM's add_request / step / abort_request).

The engine turns prompts into `Request`s, drives scheduler -> runner ->
scheduler.update each step, detokenizes incrementally, applies stop strings,
and assembles vLLM's `RequestOutput`s. `n > 1` fans out into one child request
per sample (as vLLM V1 does) and is reported as one output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aotllm.runtime.detokenizer import IncrementalDetokenizer
from aotllm.runtime.model_runner import ModelRunner, SampledToken
from aotllm.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from aotllm.runtime.request import Request, RequestStatus
from aotllm.runtime.sampling_params import SamplingParams
from aotllm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


@dataclass
class _Sample:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.samples)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        vocab_size: int,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, str] = {}

    @classmethod
    def from_engine_args(cls, args) -> "LLMEngine":
        from aotllm.runtime.loader import build_engine

        return build_engine(args)

    # -- requests -----------------------------------------------------------

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

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet; leave it as None")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        arrival_time = time.time() if arrival_time is None else arrival_time
        group = _Group(request_id, text, token_ids)
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                # Each sample of a seeded request gets its own stream, as in vLLM.
                child_params = params.clone(seed=params.seed + i)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(
                request_id=child_id,
                prompt_token_ids=list(token_ids),
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival_time,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            wants_lp = params.logprobs is not None
            group.samples.append(
                _Sample(req, detok, [] if wants_lp else None, 0.0 if wants_lp else None)
            )
            self._child_to_group[child_id] = request_id
        self._groups[request_id] = group
        for s in group.samples:
            self.scheduler.add_request(s.request)

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        for rid in ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            for s in group.samples:
                self.scheduler.abort_request(s.request.request_id)
                self._child_to_group.pop(s.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- the step loop ------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the outputs of requests that got new tokens
        (cumulative, as vLLM's LLMEngine does)."""
        sched = self.scheduler.schedule()
        sampled = self.runner.execute(sched)
        updated = self.scheduler.update(
            sched, {rid: s.token_id for rid, s in sampled.items()}
        )
        touched: dict[str, _Group] = {}
        for req in updated:
            gid = self._child_to_group.get(req.request_id)
            if gid is None:
                continue
            group = self._groups[gid]
            sample = next(s for s in group.samples if s.request is req)
            self._process_token(req, sample, sampled[req.request_id])
            touched[gid] = group
        outputs = [self._make_output(g) for g in touched.values()]
        for g in touched.values():
            if g.finished:
                del self._groups[g.request_id]
                for s in g.samples:
                    self._child_to_group.pop(s.request.request_id, None)
        return outputs

    def _process_token(self, req: Request, sample: _Sample, tok: SampledToken) -> None:
        if sample.logprobs is not None and tok.logprobs is not None:
            for tid, lp in tok.logprobs.items():
                lp.decoded_token = sample.detokenizer.decode_token(tid)
            sample.logprobs.append(tok.logprobs)
            sample.cumulative_logprob += tok.logprobs[tok.token_id].logprob
        # The scheduler has already finished a request whose token is EOS or a
        # stop token id; that token's text is left out, as in vLLM.
        stop_terminated = req.status is RequestStatus.FINISHED_STOPPED
        stop_str = sample.detokenizer.update([tok.token_id], stop_terminated=stop_terminated)
        if stop_str is not None and not req.status.finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            req.stop_reason = stop_str

    def _make_output(self, group: _Group) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=i,
                # Holds back text that may still become a stop string or an
                # unfinished character; everything final once finished.
                text=s.detokenizer.get_next_output_text(
                    delta=False, finished=s.request.status.finished
                ),
                token_ids=list(s.request.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.request.status.finish_reason,
                stop_reason=s.request.stop_reason,
            )
            for i, s in enumerate(group.samples)
        ]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=None,
            outputs=outs,
            finished=group.finished,
        )
