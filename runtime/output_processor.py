"""OutputProcessor: turns the core's token ids into vLLM's `RequestOutput`s.

Per request it keeps the incremental detokenizer (stop strings included),
the logprobs, the timestamps (`RequestMetrics`) and what has already been
handed out, so that an output can be cumulative (`LLM.generate`), a delta
(streaming) or final only, as the request's `output_kind` asks. A request of
`n` samples is one group here and `n` child requests in the core.

A stop string is found here, not in the core, because it is a property of
the text; the processor reports such children (`reqs_to_stop`) and the
engine finishes them in the core in the same step, which frees their blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from aotllm.runtime.detokenizer import IncrementalDetokenizer
from aotllm.runtime.engine_core import CoreOutput, EngineCoreOutputs
from aotllm.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from aotllm.runtime.request import RequestStatus
from aotllm.runtime.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Sample:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent: int = 0  # tokens (and logprobs) already handed out as deltas

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    metrics: RequestMetrics
    samples: dict[str, _Sample] = field(default_factory=dict)  # child id -> sample
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples.values())


@dataclass
class FinishedStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float


@dataclass
class IterationStats:
    """What one step produced, for the Prometheus metrics."""

    num_generation_tokens: int = 0
    # Prompt tokens of requests whose first token came this step.
    num_prompt_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Children a stop string ended: the engine finishes them in the core.
    reqs_to_stop: list[str]
    stats: IterationStats


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}
        self._child_to_request: dict[str, str] = {}

    def has_request(self, request_id: str) -> bool:
        return request_id in self._states

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        state = RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
            output_kind=params.output_kind,
            metrics=RequestMetrics(arrival_time=arrival_time, last_token_time=arrival_time),
        )
        wants_lp = params.logprobs is not None
        for index, child_id in enumerate(child_ids):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            state.samples[child_id] = _Sample(
                index, detok, logprobs=[] if wants_lp else None,
                cumulative_logprob=0.0 if wants_lp else None)
            self._child_to_request[child_id] = request_id
        self._states[request_id] = state

    def abort_requests(self, request_ids: list[str],
                       now: float) -> tuple[list[str], list[RequestOutput]]:
        """Drops the requests; returns their child ids (for the core) and final
        outputs whose unfinished samples say finish_reason "abort"."""
        child_ids, outputs = [], []
        for rid in request_ids:
            state = self._states.pop(rid, None)
            if state is None:
                continue
            for child_id, s in state.samples.items():
                self._child_to_request.pop(child_id, None)
                child_ids.append(child_id)
                if not s.finished:
                    s.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
            state.metrics.finished_time = now
            delta = state.output_kind is RequestOutputKind.DELTA
            outputs.append(self._make_output(state, list(state.samples.values()), delta))
        return child_ids, outputs

    def process_outputs(self, core: EngineCoreOutputs) -> ProcessedOutputs:
        stats = IterationStats()
        now = core.timestamp
        for child_id in core.first_scheduled:
            state = self._states.get(self._child_to_request.get(child_id, ""))
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = core.scheduled_time
                state.metrics.time_in_queue = core.scheduled_time - state.metrics.arrival_time
        touched: dict[str, list[_Sample]] = {}
        reqs_to_stop: list[str] = []
        for out in core.outputs:
            rid = self._child_to_request.get(out.request_id)
            if rid is None:
                continue  # aborted since it was scheduled
            state = self._states[rid]
            sample = state.samples[out.request_id]
            if sample.index == 0:
                # The first sample's hit is what the prompt found in the cache
                # on arrival; the other samples then hit what it computed.
                state.num_cached_tokens = out.num_cached_tokens
            if self._process_sample(sample, out):
                reqs_to_stop.append(out.request_id)
            touched.setdefault(rid, []).append(sample)
            stats.num_generation_tokens += len(out.new_token_ids)
        outputs = []
        for rid, samples in touched.items():
            state = self._states[rid]
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                stats.time_to_first_tokens.append(now - m.arrival_time)
                stats.num_prompt_tokens += len(state.prompt_token_ids)
            else:
                stats.inter_token_latencies.append(now - m.last_token_time)
            m.last_token_time = now
            for s in samples:
                if s.finished:
                    stats.finished.append(FinishedStats(
                        s.finish_reason, len(state.prompt_token_ids), len(s.token_ids),
                        now - m.arrival_time))
            if state.finished:
                m.finished_time = now
                del self._states[rid]
                for child_id in state.samples:
                    self._child_to_request.pop(child_id, None)
            output = self._output_for(state, samples)
            if output is not None:
                outputs.append(output)
        return ProcessedOutputs(outputs, reqs_to_stop, stats)

    def _process_sample(self, sample: _Sample, out: CoreOutput) -> bool:
        """Applies one core output; True when a stop string ended the sample."""
        if sample.logprobs is not None and out.new_logprobs is not None:
            for tok, step in zip(out.new_token_ids, out.new_logprobs):
                for tid, lp in step.items():
                    lp.decoded_token = sample.detokenizer.decode_token(tid)
                sample.logprobs.append(step)
                sample.cumulative_logprob += step[tok].logprob
        sample.token_ids.extend(out.new_token_ids)
        # The core has already finished a request whose token is EOS or a stop
        # token id; that token's text is left out, as in vLLM.
        stop_terminated = out.status is RequestStatus.FINISHED_STOPPED
        stop_str = sample.detokenizer.update(out.new_token_ids, stop_terminated=stop_terminated)
        if out.finished:
            sample.finish_reason = out.status.finish_reason
            sample.stop_reason = out.stop_reason
            return False
        if stop_str is not None:
            sample.finish_reason = RequestStatus.FINISHED_STOPPED.finish_reason
            sample.stop_reason = stop_str
            return True
        return False

    def _output_for(self, state: RequestState, touched: list[_Sample]) -> RequestOutput | None:
        kind = state.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        if kind is RequestOutputKind.DELTA:
            return self._make_output(state, touched, delta=True)
        return self._make_output(state, list(state.samples.values()))

    def _make_output(self, state: RequestState, samples: list[_Sample],
                     delta: bool = False) -> RequestOutput:
        outs = []
        for s in samples:
            # Holds back text that may still become a stop string or an
            # unfinished character; everything is final once finished.
            text = s.detokenizer.get_next_output_text(delta=delta, finished=s.finished)
            start = s.num_sent if delta else 0
            outs.append(CompletionOutput(
                index=s.index,
                text=text,
                token_ids=s.token_ids[start:],
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs[start:] if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
            if delta:
                s.num_sent = len(s.token_ids)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=None,
            outputs=outs,
            finished=state.finished,
            metrics=dataclasses.replace(state.metrics),
            num_cached_tokens=state.num_cached_tokens,
        )
