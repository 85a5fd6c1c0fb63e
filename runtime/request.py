"""Request state and the scheduler's plain-Python output (no tensors here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aotllm.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass
class Request:
    """One sequence being generated (vLLM V1: each of `n` samples is its own Request)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: "SamplingParams"
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache. Reset to 0 on preemption (recompute).
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # The token id that ended the request (EOS / stop token), if any.
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Prefix-cache hashes of the request's full blocks (prompt and output),
    # filled by the scheduler as it needs them; tokens never change, so they
    # survive preemption.
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens found in the prefix cache when first scheduled (-1: not yet).
    num_cached_tokens: int = -1

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass
class ScheduledSeq:
    """The work for one request in one step."""

    request: Request
    # Tokens to run through the model this step (a prefill chunk, or the one
    # token of a decode step), starting at absolute position `start_pos`.
    token_ids: list[int]
    start_pos: int
    # The request's whole block table after this step's allocation.
    block_ids: list[int]
    # True when this step ends at the request's last token, so the logits of
    # its last token are sampled; False for a prefill chunk that is not the last.
    sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    phase: str  # "prefill" or "decode"; a step never mixes them
    seqs: list[ScheduledSeq]
    # Requests that lost their blocks this step and will be recomputed.
    preempted_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the last step; the runner
    # drops its per-request state (e.g. seeded generators) for them.
    finished_ids: list[str] = field(default_factory=list)
    # Requests scheduled for the first time this step (not recomputes).
    first_scheduled_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)
