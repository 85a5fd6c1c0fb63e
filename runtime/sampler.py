"""The tensor side of sampling: logits of the sampling rows -> one token per row.

The order follows vLLM V1's sampler: logprobs from the raw logits; min_tokens
masking; repetition/frequency/presence penalties; greedy rows take the argmax;
the other rows divide by their temperature, apply min_p, then top_k, then
top_p, and draw.

Drawing uses the exponential race: argmax(probs / q) with q ~ Exp(1) i.i.d.
picks token i with probability probs[i]. A seeded row draws its q from its own
generator with shape [vocab], so its token does not depend on which other rows
share the batch or where it sits in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aotllm.runtime.outputs import Logprob
from aotllm.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # The request's own generator, required when params.seed is set.
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: the sampled token plus the top-`logprobs` tokens, with ranks;
    # None where the row did not ask for logprobs.
    logprobs: list[dict[int, Logprob] | None]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator for a seeded request (create once, keep across steps)."""
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] | set[int]) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
        for i, row in enumerate(rows):
            if row.params.seed is not None and row.generator is None:
                raise ValueError(f"row {i} has seed={row.params.seed} but no generator")
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        if all(self._is_plain_greedy(r) for r in rows):
            # The common decode case: nothing to edit, so no copy of the logits.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        # Our own float32 copy: everything below edits it in place.
        logits = logits.to(torch.float32, copy=True)
        raw_logprobs = _raw_logprobs(logits, rows)
        self._mask_eos_before_min_tokens(logits, rows)
        _apply_penalties(logits, rows)

        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        # top_k=1 is greedy under any temperature; taking the argmax here keeps
        # it exact even when the top logits tie.
        takes_argmax = [r.params.is_greedy or r.params.top_k == 1 for r in rows]
        greedy = [i for i, a in enumerate(takes_argmax) if a]
        rand = [i for i, a in enumerate(takes_argmax) if not a]
        if greedy:
            idx = _index(greedy, logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if rand:
            idx = _index(rand, logits.device)
            probs = _filtered_probs(logits[idx], [rows[i].params for i in rand])
            tokens[idx] = _draw(probs, [rows[i] for i in rand], generator)

        logprobs = _gather_logprobs(raw_logprobs, rows, tokens)
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)

    @staticmethod
    def _is_plain_greedy(row: SamplingRow) -> bool:
        p = row.params
        return (
            (p.is_greedy or p.top_k == 1)
            and p.logprobs is None
            and p.repetition_penalty == 1.0
            and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0
            and len(row.output_token_ids) >= p.min_tokens
        )

    def _mask_eos_before_min_tokens(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> None:
        vocab = logits.shape[1]
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, row in enumerate(rows):
            if len(row.output_token_ids) < row.params.min_tokens:
                # vLLM masks EOS and the stop token ids, ignore_eos or not.
                stops = self.eos_token_ids.union(row.params.stop_token_ids)
                for t in stops:
                    if t < vocab:
                        row_idx.append(i)
                        tok_idx.append(t)
        if row_idx:
            logits[_index(row_idx, logits.device), _index(tok_idx, logits.device)] = -float("inf")


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _raw_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[list[int], torch.Tensor | None]:
    """log_softmax of the unprocessed logits, only for the rows that asked for logprobs."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return wanted, None
    return wanted, torch.log_softmax(logits[_index(wanted, logits.device)], dim=-1)


def _bin_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float counts of each token id per row."""
    width = max((len(t) for t in token_lists), default=0)
    # Pad with an extra id `vocab` whose column is dropped afterwards.
    padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if toks:
            padded[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    which = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        or r.params.frequency_penalty != 0.0
        or r.params.presence_penalty != 0.0
    ]
    if not which:
        return
    device, vocab = logits.device, logits.shape[1]
    idx = _index(which, device)
    sub = logits[idx]
    params = [rows[i].params for i in which]
    out_counts = _bin_counts([rows[i].output_token_ids for i in which], vocab, device)
    prompt_seen = _bin_counts([rows[i].prompt_token_ids for i in which], vocab, device) > 0
    out_seen = out_counts > 0

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    # Repetition penalty (HF/vLLM): over prompt and output tokens, shrink
    # positive logits and push negative ones further down.
    rep = column([p.repetition_penalty for p in params])
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(prompt_seen | out_seen, penalised, sub)
    # Frequency and presence penalties look at the output tokens only.
    sub = sub - column([p.frequency_penalty for p in params]) * out_counts
    sub = sub - column([p.presence_penalty for p in params]) * out_seen
    logits[idx] = sub


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p (vLLM V1's order) -> probabilities [rows, vocab]."""
    device, vocab = logits.device, logits.shape[1]
    logits = logits / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    neg_inf = -float("inf")

    # Decide from the Python params, so no branch waits on the device.
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        probs = torch.softmax(logits, dim=-1)
        # The max-prob token always survives, as min_p <= 1.
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), neg_inf)

    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k) or any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # Keep every token at least as likely as the k-th (ties kept, like vLLM).
        kth = sorted_logits.gather(1, _index([k - 1 for k in top_k], device).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
        # Drop a token once the more likely ones already hold top_p of the mass;
        # the first token always stays (its preceding mass is 0 < top_p).
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = (mass_before >= top_p) & (top_p < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)

    # At least the top token is finite in every row, so there are no NaNs.
    return torch.softmax(logits, dim=-1)


def _draw(
    probs: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None
) -> torch.Tensor:
    q = torch.empty_like(probs)
    unseeded = [j for j, r in enumerate(rows) if r.generator is None]
    if unseeded:
        if len(unseeded) == len(rows):
            q.exponential_(generator=generator)
        else:
            idx = _index(unseeded, probs.device)
            q[idx] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=generator
            )
    for j, r in enumerate(rows):
        if r.generator is not None:
            q[j].exponential_(generator=r.generator)
    # Exp(1) can return exactly 0; clamping keeps probs / q finite and a
    # filtered token (prob 0) at 0, so it can never win.
    q.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / q).argmax(dim=-1)


def _gather_logprobs(
    raw: tuple[list[int], torch.Tensor | None], rows: Sequence[SamplingRow], tokens: torch.Tensor
) -> list[dict[int, Logprob] | None]:
    out: list[dict[int, Logprob] | None] = [None] * len(rows)
    wanted, lp = raw
    if lp is None:
        return out
    sampled = tokens[_index(wanted, tokens.device)].unsqueeze(1)
    sampled_lp = lp.gather(1, sampled)
    # vLLM V1's rank: how many tokens are at least as likely as the sampled one.
    ranks = (lp >= sampled_lp).sum(dim=-1)
    max_k = min(max(rows[i].params.logprobs or 0 for i in wanted), lp.shape[1])
    top_lp, top_ids = lp.topk(max_k, dim=-1)
    # One device->host copy per tensor, then plain Python.
    sampled_l, sampled_lp_l = sampled[:, 0].tolist(), sampled_lp[:, 0].tolist()
    ranks_l = ranks.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        entry = {sampled_l[j]: Logprob(logprob=sampled_lp_l[j], rank=ranks_l[j])}
        k = min(rows[i].params.logprobs or 0, max_k)
        # A sampled token inside the top-k takes its top-k rank, as in vLLM.
        for r in range(k):
            entry[top_ids_l[j][r]] = Logprob(logprob=top_lp_l[j][r], rank=r + 1)
        out[i] = entry
    return out
