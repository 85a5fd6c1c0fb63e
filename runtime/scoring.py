"""Perplexity of a token sequence through the serving runtime (teacher forcing).

The compiled graphs return only the logits of each row's last token, so a
text is scored one token per decode step: each window of tokens is one decode
row fed its own tokens in order, and the logits after token i score token
i + 1. Several windows advance together as the rows of one decode batch. The
step runs on the engine's own executor, KV cache and block manager, so what is
measured is exactly what `generate` serves from the same artifact (its dtype,
its quantization, its buckets and their padding).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from aotllm.runtime.request import Request, ScheduledSeq
from aotllm.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from aotllm.runtime.engine import LLMEngine

# Default window cap: long enough for a meaningful context, short enough that
# a decode step over the window stays cheap whatever max_model_len is.
DEFAULT_WINDOW_CAP = 1024
# Block-manager ids of the scoring rows; no user request can hold these.
_ROW_ID_PREFIX = "\x00score-"


@dataclass(frozen=True)
class ScoreResult:
    num_tokens: int  # scored positions: every token but the first
    nll: float  # summed negative log-likelihood (nats)
    predictions: list[int]  # argmax of the logits at each scored position, in order
    targets: list[int]  # the token each position was scored against
    # top-1 minus top-2 logit at each position: how decisively the model
    # chose, so a comparison of two artifacts can tell real disagreements
    # from near-ties that rounding alone flips.
    margins: list[float]
    num_windows: int
    window: int  # the most tokens one window held

    @property
    def mean_nll(self) -> float:
        return self.nll / self.num_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


# Two bf16 ulps at the logits' typical magnitude (16-32, ulp 0.125): where a
# bf16 reference's top two logits are closer than this, rounding alone picks
# its winner.
BF16_NEAR_TIE = 0.25


def top1_agreement(a: ScoreResult, ref: ScoreResult, min_margin: float = float("-inf")
                   ) -> tuple[float, int]:
    """Share of positions where `a` and `ref` predict the same next token,
    over the positions where `ref`'s top two logits are more than
    `min_margin` apart; and how many positions those are."""
    if a.targets != ref.targets:
        raise ValueError("the two scores are of different token sequences")
    kept = [x == y for x, y, m in zip(a.predictions, ref.predictions, ref.margins)
            if m > min_margin]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)


def split_windows(num_tokens: int, window: int) -> list[tuple[int, int]]:
    """`[start, stop)` spans of at most `window` tokens, overlapping by one token.

    The overlap makes every token but the very first a target exactly once:
    a window's first token only gives context (it was the previous window's
    last target), so N tokens always score N - 1 positions.
    """
    assert window >= 2 and num_tokens >= 2, (window, num_tokens)
    return [(s, min(s + window, num_tokens)) for s in range(0, num_tokens - 1, window - 1)]


@dataclass
class _Row:
    """One window being fed through decode steps."""

    index: int
    request: Request  # carries the block-manager id and the window's tokens
    fed: int = 0  # tokens already run through the model
    nll: float = 0.0
    predictions: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def done(self) -> bool:
        # The last token is only a target: feeding it would score nothing.
        return self.fed == len(self.tokens) - 1


def _resolve_batch(engine: "LLMEngine", batch: int | None, window: int, num_windows: int) -> int:
    limit = engine.runner.executor.max_batch("decode")
    if batch is None:
        batch = engine.scheduler.config.max_num_seqs
        if limit is not None:
            batch = min(batch, limit)
    elif batch < 1 or (limit is not None and batch > limit):
        raise ValueError(
            f"batch must be between 1 and {limit}, the largest decode batch of the artifact; "
            f"got {batch}"
        )
    bm = engine.scheduler.block_manager
    # Every row may grow to a full window, so reserve for that up front:
    # running out of blocks mid-window would have no one to preempt.
    fits = bm.num_free_blocks // -(-window // bm.block_size)
    if fits == 0:
        raise ValueError(
            f"the KV cache has {bm.num_free_blocks} free blocks of {bm.block_size} tokens, "
            f"too few for one window of {window} tokens; pass a smaller window"
        )
    return min(batch, fits, num_windows)


def score_tokens(
    engine: "LLMEngine",
    token_ids: list[int],
    window: int | None = None,
    batch: int | None = None,
) -> ScoreResult:
    """Teacher-forced NLL of `token_ids`, scored in windows of at most `window`
    tokens (default: the engine's max_model_len capped at 1024), `batch`
    windows at a time (default: the engine's max_num_seqs, at most the largest
    decode bucket). Borrows KV blocks from the engine and frees them all."""
    token_ids = list(token_ids)
    if len(token_ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(token_ids)}")
    bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < engine.vocab_size]
    if bad:
        raise ValueError(
            f"token id {bad[0]!r} is out of vocabulary (the model has {engine.vocab_size} tokens)"
        )
    if window is None:
        window = min(engine.max_model_len, DEFAULT_WINDOW_CAP)
    if not 2 <= window <= engine.max_model_len:
        raise ValueError(
            f"window must be between 2 and max_model_len ({engine.max_model_len}); got {window}"
        )
    spans = split_windows(len(token_ids), window)
    batch = _resolve_batch(engine, batch, window, len(spans))
    runner, bm = engine.runner, engine.scheduler.block_manager
    params = SamplingParams(max_tokens=1)  # unused: these rows are never sampled
    pending = deque(enumerate(spans))
    active: list[_Row] = []
    finished: dict[int, _Row] = {}
    try:
        while pending or active:
            while pending and len(active) < batch:
                i, (start, stop) = pending.popleft()
                rid = f"{_ROW_ID_PREFIX}{i}"
                assert not bm.has_blocks(rid), rid
                active.append(_Row(i, Request(rid, token_ids[start:stop], params)))
            seqs = []
            for row in active:
                rid, pos = row.request.request_id, row.fed
                # Grown token by token as the scheduler does, so each step
                # runs on the context bucket a served request would use.
                bm.allocate(rid, pos + 1)
                seqs.append(ScheduledSeq(row.request, [row.tokens[pos]], pos,
                                         bm.block_table(rid), sample=False))
            logits = runner.run_logits("decode", seqs)
            targets = torch.tensor([r.tokens[r.fed + 1] for r in active], device=logits.device)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            argmax = logits.argmax(dim=-1).tolist()  # the first of tied maxima, as torch picks
            top2 = logits.float().topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
            for row, lp, pred, margin in zip(active, picked, argmax, margins):
                row.nll -= lp  # a Python float: the sum is kept in float64
                row.predictions.append(pred)
                row.margins.append(margin)
                row.fed += 1
            for row in [r for r in active if r.done]:
                active.remove(row)
                bm.free(row.request.request_id)
                finished[row.index] = row
    finally:
        for row in active:
            bm.free(row.request.request_id)
    rows = [finished[i] for i in range(len(spans))]
    return ScoreResult(
        num_tokens=len(token_ids) - 1,
        nll=sum(r.nll for r in rows),
        predictions=[p for r in rows for p in r.predictions],
        targets=[t for r in rows for t in r.tokens[1:]],
        margins=[m for r in rows for m in r.margins],
        num_windows=len(spans),
        window=window,
    )


def evaluate_perplexity(
    llm_or_engine: Any, text: str, window: int | None = None, batch: int | None = None
) -> ScoreResult:
    """Tokenizes `text` and scores it with `score_tokens`; takes an `LLM` or an `LLMEngine`.

    Only the tokenizer's BOS is added, and only if its own `encode` adds one
    (Llama-style tokenizers do, Qwen2's do not): BOS gives the first text
    token a context, as in training, while EOS or other special tokens would
    score tokens that are not in the text.
    """
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    tokenizer = engine.tokenizer
    # verbose=False: a text longer than the model is expected here (it is windowed).
    ids = list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    if not ids:
        raise ValueError("the text has no tokens")
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]
    if adds_bos and ids[0] != bos:  # a text that starts with a literal BOS keeps just that one
        ids = [bos, *ids]
    return score_tokens(engine, ids, window=window, batch=batch)
