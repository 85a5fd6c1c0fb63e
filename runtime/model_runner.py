"""The model runner: owns every tensor, makes no scheduling decisions.

Each step it turns the scheduler's plain-Python output into the graph
signature's input tensors (padded to the shape the executor asks for), runs
the executor, and samples the rows that end at their last token.

An *executor* is whatever computes logits from the graph inputs: the eager
model (`EagerExecutor`) or a table of compiled bucket graphs. It tells the
runner how to pad a step (`padded_shape`), so padding rules live with the
graphs that need them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from aotllm.graphs.kv_cache import NULL_BLOCK, KVCacheSpec
from aotllm.runtime.outputs import Logprob
from aotllm.runtime.request import ScheduledSeq, SchedulerOutput
from aotllm.runtime.sampler import Sampler, SamplingRow, make_generator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepShape:
    batch: int
    tokens: int
    context_blocks: int


class Executor(Protocol):
    device: torch.device

    def max_batch(self, phase: str) -> int | None:
        """Most rows one call of `phase` takes (None: any)."""
        ...

    def padded_shape(self, phase: str, shape: StepShape) -> StepShape: ...

    def group_rows(self, phase: str, rows: list[StepShape],
                   depends_on: list[list[int]]) -> list[list[int]]:
        """Splits a step's rows (each a batch-1 shape) into calls: row indices
        per call, in the order to run them. A row runs no earlier than the rows
        in its `depends_on` (it reads K/V they write this step)."""
        ...

    def __call__(
        self,
        phase: str,
        shape: StepShape,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        query_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor: ...


class EagerExecutor:
    """Runs the torch module directly at the step's exact shape."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device

    def max_batch(self, phase: str) -> int | None:
        return None

    def padded_shape(self, phase: str, shape: StepShape) -> StepShape:
        return shape

    def group_rows(self, phase: str, rows: list[StepShape],
                   depends_on: list[list[int]]) -> list[list[int]]:
        return [list(range(len(rows)))]

    @torch.inference_mode()
    def __call__(self, phase, shape, *inputs):
        *tensors, kv_caches = inputs
        return self.model(*tensors, kv_caches)


@dataclass
class SampledToken:
    token_id: int
    logprobs: dict[int, Logprob] | None


class ModelRunner:
    def __init__(
        self,
        executor: Executor,
        kv_spec: KVCacheSpec,
        num_blocks: int,
        sampler: Sampler,
        kv_dtype: torch.dtype,
        seed: int | None = 0,
    ):
        self.executor = executor
        self.device = executor.device
        self.kv_spec = kv_spec
        self.sampler = sampler
        # Zeroed, not empty: masked-out cache entries must be finite.
        self.kv_caches = [
            torch.zeros(kv_spec.layer_shape(num_blocks), dtype=kv_dtype, device=self.device)
            for _ in range(kv_spec.num_layers)
        ]
        # Unseeded requests draw from this engine-wide generator (vLLM's `seed`).
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._request_generators: dict[str, torch.Generator] = {}
        # Device copy of the step inputs, reused across steps (non-CPU devices).
        self._input_buffer: torch.Tensor | None = None

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = make_generator(seed, self.device)
            self._request_generators[request_id] = gen
        return gen

    def _build_inputs(self, seqs: list[ScheduledSeq], shape: StepShape) -> list[torch.Tensor]:
        """Pads the step to `shape`: padding rows and tokens write to the null block.

        All six inputs are laid out in one flat int64 list, turned into one
        host tensor and copied once into a persistent device buffer (grown to
        the largest step seen); each graph input is a contiguous view of it.
        """
        bs = self.kv_spec.block_size
        b, t, maxb = shape.batch, shape.tokens, shape.context_blocks
        n = b * t
        # ids | positions | slots | block tables | context lens | query lens
        sizes = (n, n, n, b * maxb, b, b)
        flat = [0] * (3 * n) + [NULL_BLOCK] * (b * maxb) + [1] * (2 * b)
        pos_at, slot_at, table_at, ctx_at, q_at = n, 2 * n, 3 * n, 3 * n + b * maxb, 3 * n + b * maxb + b
        for i, seq in enumerate(seqs):
            k = len(seq.token_ids)
            row = i * t
            flat[row : row + k] = seq.token_ids
            pos = range(seq.start_pos, seq.start_pos + k)
            flat[pos_at + row : pos_at + row + k] = pos
            flat[slot_at + row : slot_at + row + k] = [
                seq.block_ids[p // bs] * bs + p % bs for p in pos
            ]
            flat[table_at + i * maxb : table_at + i * maxb + len(seq.block_ids)] = seq.block_ids
            flat[ctx_at + i] = seq.start_pos + k
            flat[q_at + i] = k
        host = torch.tensor(flat, dtype=torch.int64)
        if self.device.type == "cpu":
            buf = host
        else:
            if self._input_buffer is None or self._input_buffer.numel() < host.numel():
                self._input_buffer = torch.empty(host.numel(), dtype=torch.int64, device=self.device)
            buf = self._input_buffer[: host.numel()]
            buf.copy_(host)
        ids, positions, slots, tables, ctx, qlens = buf.split(sizes)
        return [ids.view(b, t), positions.view(b, t), slots, tables.view(b, maxb), ctx, qlens]

    def execute(self, sched: SchedulerOutput) -> dict[str, SampledToken]:
        # A preempted request keeps its generator: its recompute must not
        # replay random draws it has already used.
        for rid in sched.finished_ids:
            self._request_generators.pop(rid, None)
        seqs = sched.seqs
        if not seqs:
            return {}
        rows = [StepShape(1, len(s.token_ids), len(s.block_ids)) for s in seqs]
        # Decode rows only read their own earlier tokens.
        deps = (_step_dependencies(seqs, self.kv_spec.block_size) if sched.phase == "prefill"
                else [[] for _ in seqs])
        groups = self.executor.group_rows(sched.phase, rows, deps)
        parts = [self.run_logits(sched.phase, [seqs[i] for i in g]) for g in groups]
        order = [i for g in groups for i in g]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        # One sampler call for the whole step, in the step's row order: the
        # draws do not depend on how the rows were split into graph calls.
        at = {row: k for k, row in enumerate(order)}
        return self._sample(seqs, logits, [at[i] for i in range(len(seqs))])

    def run_logits(self, phase: str, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Runs one step without sampling: `[len(seqs), vocab]` float32 logits of
        each row's last token (padding rows dropped). The rows' blocks must
        already be allocated; at most `executor.max_batch(phase)` rows."""
        limit = self.executor.max_batch(phase)
        assert seqs and (limit is None or len(seqs) <= limit), (len(seqs), limit)
        exact = StepShape(
            batch=len(seqs),
            tokens=max(len(s.token_ids) for s in seqs),
            context_blocks=max(len(s.block_ids) for s in seqs),
        )
        shape = self.executor.padded_shape(phase, exact)
        inputs = self._build_inputs(seqs, shape)
        logits = self.executor(phase, shape, *inputs, self.kv_caches)
        return logits[: len(seqs)]

    def _sample(self, seqs: list[ScheduledSeq], logits: torch.Tensor,
                logit_rows: list[int]) -> dict[str, SampledToken]:
        """Samples every row that ends at its last token; `logit_rows[i]` is
        seq i's row of `logits`."""
        rows = [i for i, s in enumerate(seqs) if s.sample]
        if not rows:
            return {}
        sampling_rows = []
        for i in rows:
            req = seqs[i].request
            sampling_rows.append(
                SamplingRow(
                    params=req.sampling_params,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=req.output_token_ids,
                    generator=self._generator_for(req.request_id, req.sampling_params.seed),
                )
            )
        picked = [logit_rows[i] for i in rows]
        if picked == list(range(len(picked))):  # rows 0..n-1: a view, no gather
            sample_logits = logits[: len(picked)]
        else:
            sample_logits = logits.index_select(0, torch.tensor(picked, device=logits.device))
        out = self.sampler(sample_logits, sampling_rows, self.generator)
        return {
            seqs[i].request_id: SampledToken(tok, lp)
            for i, tok, lp in zip(rows, out.token_ids, out.logprobs)
        }


def _step_dependencies(seqs: list[ScheduledSeq], block_size: int) -> list[list[int]]:
    """For each row, the earlier rows of the step whose new K/V it reads: a
    prefix-cache hit on blocks that an earlier row writes in this very step
    (the `n` samples of one prompt admitted together)."""
    writer: dict[int, int] = {}
    deps: list[list[int]] = []
    for i, s in enumerate(seqs):
        end = s.start_pos + len(s.token_ids)
        read = s.block_ids[: -(-s.start_pos // block_size)]
        deps.append(sorted({writer[b] for b in read if b in writer}))
        for b in s.block_ids[s.start_pos // block_size : -(-end // block_size)]:
            writer.setdefault(b, i)
    return deps
