"""The bucket table: which static shapes get a compiled graph.

A bucket is ``(phase, batch B, tokens T, context blocks MAXB)``. Prefill
buckets vary T (the largest T is also the chunk size for longer prompts) and
MAXB: each T gets a block table just wide enough for a prompt that starts at
position 0, plus one ``max_model_len`` wide for chunks that start later
(chunked prefill, prefix-cache hits). The smaller T also get buckets with
B > 1, so that several waiting prompts prefill in one graph call. Decode
buckets have T=1 and are the cross product of batch sizes and context
lengths. Every bucket's block table is ``MAXB`` wide, so a graph can attend to
at most ``MAXB * block_size`` tokens, and gathers that many per layer.

`plan_buckets` is the one pure function that computes the table; the compiler
builds one graph per bucket, the manifest records the table, and the runtime
pads each step to the cheapest bucket that fits (`pad_to_bucket`), or, for a
prefill step of several rows, splits the rows into the cheapest set of calls
(`group_rows`). The scheduler never forms a step larger than the largest
bucket, so the runner never needs an eager fallback.

Stdlib only: the runtime and the compiler both import this.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PHASES = ("prefill", "decode")

# Prefill graphs beyond this many tokens cost compile time and memory for
# little gain: longer prompts are prefilled in chunks of the largest bucket.
_DEFAULT_PREFILL_CAP = 2048
_DEFAULT_MIN_PREFILL = 16
_DEFAULT_MIN_CONTEXT = 256
# Batched prefill: 4 rows per call at most by default. Small prompts (16-64
# tokens) are bound by reading the weights, so 4 in one call cost about what
# one does; longer ones are compute-bound and gain only the per-call overhead.
_DEFAULT_PREFILL_BATCH = 4
# A prefill bucket gets a context narrower than max_model_len only where it
# gathers at most this fraction of it: a 2x narrower table saves too little
# attention work to pay for a graph.
_SIZED_CONTEXT_MAX_FRACTION = 4


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    try:
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a positive integer, got {value!r}") from None
    if result <= 0:
        raise ValueError(f"{what} must be a positive integer, got {result}")
    return result


@dataclass(frozen=True)
class Bucket:
    phase: str  # "prefill" | "decode"
    batch: int  # B
    tokens: int  # T (decode: 1)
    context_blocks: int  # MAXB: block-table width

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"bucket phase must be one of {PHASES}, got {self.phase!r}")
        for field_name in ("batch", "tokens", "context_blocks"):
            object.__setattr__(
                self, field_name, _positive_int(getattr(self, field_name), f"bucket {field_name}")
            )
        if self.phase == "decode" and self.tokens != 1:
            raise ValueError(f"a decode bucket has tokens=1, got tokens={self.tokens}")

    @property
    def name(self) -> str:
        """Stable, file-name safe identifier; graph files are named after it."""
        return f"{self.phase}_b{self.batch}_t{self.tokens}_c{self.context_blocks}"

    @property
    def cost(self) -> tuple[int, int]:
        """What padding to this bucket costs: tokens computed first (linears are
        most of the work), then context blocks gathered (every row gathers its
        whole block table per layer)."""
        return (self.batch * self.tokens, self.batch * self.context_blocks)

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "batch": self.batch,
            "tokens": self.tokens,
            "context_blocks": self.context_blocks,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Bucket":
        return cls(
            phase=str(d["phase"]),
            batch=d["batch"],
            tokens=d["tokens"],
            context_blocks=d["context_blocks"],
        )


def _sort_key(bucket: Bucket) -> tuple[int, int, int]:
    return (bucket.batch, bucket.tokens, bucket.context_blocks)


@dataclass(frozen=True)
class BucketPlan:
    block_size: int
    max_model_len: int
    prefill: tuple[Bucket, ...]  # sorted by (batch, tokens, context_blocks)
    decode: tuple[Bucket, ...]  # sorted by (batch, tokens, context_blocks)

    def __post_init__(self) -> None:
        _positive_int(self.block_size, "block_size")
        _positive_int(self.max_model_len, "max_model_len")
        for phase in PHASES:
            buckets = tuple(sorted(set(getattr(self, phase)), key=_sort_key))
            if not buckets:
                raise ValueError(f"a bucket plan needs at least one {phase} bucket")
            wrong = [b.name for b in buckets if b.phase != phase]
            if wrong:
                raise ValueError(f"the {phase} buckets of a plan contain {wrong}")
            object.__setattr__(self, phase, buckets)

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """Every bucket, prefill first."""
        return self.prefill + self.decode

    @property
    def max_prefill_tokens(self) -> int:
        """The prefill chunk size: prompts longer than this are prefilled in chunks."""
        return max(b.tokens for b in self.prefill)

    @property
    def max_decode_batch(self) -> int:
        return max(b.batch for b in self.decode)

    @property
    def max_context_blocks(self) -> int:
        return max(b.context_blocks for b in self.buckets)

    def bucket_for(self, phase: str, batch: int, tokens: int, context_len: int) -> Bucket:
        """`pad_to_bucket` over this plan's buckets of one phase."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return pad_to_bucket(
            getattr(self, phase), batch, tokens, context_len, block_size=self.block_size
        )

    def to_dict(self) -> dict:
        return {
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "prefill": [b.to_dict() for b in self.prefill],
            "decode": [b.to_dict() for b in self.decode],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BucketPlan":
        return cls(
            block_size=d["block_size"],
            max_model_len=d["max_model_len"],
            prefill=tuple(Bucket.from_dict(b) for b in d["prefill"]),
            decode=tuple(Bucket.from_dict(b) for b in d["decode"]),
        )


def _check_list(values: Iterable[object], what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a list of positive integers, got {values!r}")
    result = sorted({_positive_int(v, f"every entry of {what}") for v in values})
    if not result:
        raise ValueError(f"{what} must not be empty; pass None to use the defaults")
    return result


def _default_prefill(max_model_len: int, block_size: int) -> list[int]:
    cap = min(max_model_len, _DEFAULT_PREFILL_CAP)
    size = 1 << (max(_DEFAULT_MIN_PREFILL, block_size) - 1).bit_length()
    sizes = []
    # Every other power of two keeps the number of prefill graphs small; a
    # prompt pads to at most 4x its length, and chunks beyond the cap.
    while size < cap:
        sizes.append(size)
        size *= 4
    return sizes + [cap]


def _default_decode_batches(max_num_seqs: int) -> list[int]:
    # Powers of two, sparser than vLLM's CUDA-graph capture sizes (1, 2, 4,
    # then steps of 8): every size is a graph compiled ahead of time, and a
    # decode step is bound by reading the weights, so padding a batch up to
    # twice its size costs far less than it would in compute-bound prefill.
    sizes = {max_num_seqs}
    size = 1
    while size < max_num_seqs:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def _default_context(max_model_len: int, block_size: int) -> list[int]:
    largest = _round_up(max_model_len, block_size)
    size = _round_up(max(_DEFAULT_MIN_CONTEXT, block_size), block_size)
    sizes = []
    while size < largest:
        sizes.append(size)
        size *= 4
    return sizes + [largest]


def _default_prefill_batches(max_num_seqs: int) -> list[int]:
    return sorted({1, min(_DEFAULT_PREFILL_BATCH, max_num_seqs)})


def _prefill_buckets(
    tokens: list[int], batches: list[int], contexts: list[int], block_size: int
) -> list[Bucket]:
    """Prefill buckets: per T, B=1 at the narrowest listed context that holds a
    T-token prompt from position 0, and at the full context (a chunk that starts
    later: chunked prefill, a prefix-cache hit); B>1 (bursts of fresh prompts)
    at the narrow one only, for T with B*T within the largest T (a step never
    holds more tokens than that)."""
    full = contexts[-1]
    largest = tokens[-1]
    buckets = []
    for t in tokens:
        sized = next(c for c in contexts if c >= t)
        if sized * _SIZED_CONTEXT_MAX_FRACTION > full:
            sized = full
        for c in {sized, full}:
            buckets.append(Bucket("prefill", 1, t, c // block_size))
        for b in batches:
            if b > 1 and b * t <= largest:
                buckets.append(Bucket("prefill", b, t, sized // block_size))
    return buckets


def plan_buckets(
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    prefill_buckets: Sequence[int] | None = None,
    decode_batch_sizes: Sequence[int] | None = None,
    context_buckets: Sequence[int] | None = None,
    prefill_batch_sizes: Sequence[int] | None = None,
) -> BucketPlan:
    """The bucket table for one serving configuration.

    ``prefill_buckets`` are prompt-chunk lengths in tokens, ``decode_batch_sizes``
    numbers of sequences, ``context_buckets`` attention spans in tokens
    (multiples of ``block_size``), ``prefill_batch_sizes`` prompts per prefill
    call. Overrides are sorted and deduplicated. The defaults (``None``):

    - prefill: every other power of two from 16 (or ``block_size`` if larger),
      below ``min(max_model_len, 2048)``, plus that cap;
    - decode batch sizes: 1, 2, 4, then multiples of 8, plus ``max_num_seqs``,
      all at most ``max_num_seqs``;
    - context: ``max(256, block_size)`` rounded up to a block multiple, times 4
      per step, ending at ``max_model_len`` rounded up to a block multiple;
    - prefill batch sizes: 1 and ``min(4, max_num_seqs)``.

    Decode buckets are every batch size at every context. Prefill contexts
    come from the same list: each prefill length T runs one prompt at the full
    context and, where that is at most a quarter of the full width, at the
    narrowest context of at least T tokens; a batch size B > 1 runs at that
    narrow context only, for the T with B * T at most the largest T.
    """
    max_model_len = _positive_int(max_model_len, "max_model_len")
    max_num_seqs = _positive_int(max_num_seqs, "max_num_seqs")
    block_size = _positive_int(block_size, "block_size")
    full_context = _round_up(max_model_len, block_size)

    if prefill_buckets is None:
        prefill = _default_prefill(max_model_len, block_size)
    else:
        prefill = _check_list(prefill_buckets, "prefill_buckets")
        if prefill[-1] > max_model_len:
            raise ValueError(
                f"prefill_buckets {prefill} has entries above max_model_len={max_model_len}; "
                f"a prefill chunk can never be longer than a sequence, so drop them or "
                f"raise max_model_len"
            )

    if decode_batch_sizes is None:
        batches = _default_decode_batches(max_num_seqs)
    else:
        batches = _check_list(decode_batch_sizes, "decode_batch_sizes")
        if batches[-1] != max_num_seqs:
            # No eager fallback exists: a batch above the largest bucket could
            # not run, and a smaller largest bucket would silently lower max_num_seqs.
            raise ValueError(
                f"the largest of decode_batch_sizes {batches} must equal "
                f"max_num_seqs={max_num_seqs} (the scheduler never forms a batch larger "
                f"than the largest bucket); include {max_num_seqs}, drop larger sizes, "
                f"or set max_num_seqs to the largest size you want"
            )

    if prefill_batch_sizes is None:
        prefill_batches = _default_prefill_batches(max_num_seqs)
    else:
        prefill_batches = _check_list(prefill_batch_sizes, "prefill_batch_sizes")
        if prefill_batches[0] != 1:
            raise ValueError(
                f"prefill_batch_sizes {prefill_batches} must include 1: a prompt that "
                f"arrives alone (or needs a wide context) runs in a one-row bucket"
            )
        if prefill_batches[-1] > max_num_seqs:
            raise ValueError(
                f"prefill_batch_sizes {prefill_batches} has entries above "
                f"max_num_seqs={max_num_seqs}; a step never holds more sequences than "
                f"that, so drop them or raise max_num_seqs"
            )
        unused = [b for b in prefill_batches if b * prefill[0] > prefill[-1]]
        if unused:
            raise ValueError(
                f"prefill_batch_sizes {unused} times the smallest prefill bucket "
                f"({prefill[0]} tokens) exceed the largest ({prefill[-1]} tokens), the most "
                f"tokens one step prefills, so they would get no bucket; drop them"
            )

    if context_buckets is None:
        contexts = _default_context(max_model_len, block_size)
    else:
        contexts = _check_list(context_buckets, "context_buckets")
        unaligned = [c for c in contexts if c % block_size]
        if unaligned:
            raise ValueError(
                f"context_buckets {unaligned} are not multiples of block_size={block_size}; "
                f"round them up to a multiple of {block_size}"
            )
        if contexts[-1] != full_context:
            raise ValueError(
                f"the largest of context_buckets {contexts} must be {full_context} "
                f"(max_model_len={max_model_len} rounded up to a multiple of "
                f"block_size={block_size}) so that every sequence up to max_model_len has "
                f"a decode graph; "
                f"include {full_context} and drop larger values"
            )

    return BucketPlan(
        block_size=block_size,
        max_model_len=max_model_len,
        prefill=tuple(_prefill_buckets(prefill, prefill_batches, contexts, block_size)),
        decode=tuple(
            Bucket("decode", b, 1, c // block_size) for b in batches for c in contexts
        ),
    )


def pad_to_bucket(
    buckets: Sequence[Bucket],
    batch: int,
    tokens: int,
    context_len: int,
    *,
    block_size: int,
) -> Bucket:
    """The cheapest bucket (by `Bucket.cost`) that holds a step of this shape.

    ``batch`` is the number of rows, ``tokens`` the longest row's new tokens,
    ``context_len`` the longest row's attention span including its new tokens.
    """
    batch = _positive_int(batch, "batch")
    tokens = _positive_int(tokens, "tokens")
    context_len = _positive_int(context_len, "context_len")
    block_size = _positive_int(block_size, "block_size")
    if context_len < tokens:
        raise ValueError(
            f"context_len={context_len} is smaller than tokens={tokens}; context_len "
            f"counts every token a row attends to, its new tokens included"
        )
    if not buckets:
        raise ValueError("pad_to_bucket needs at least one bucket")
    phases = {b.phase for b in buckets}
    if len(phases) != 1:
        raise ValueError(f"pad_to_bucket takes buckets of one phase, got {sorted(phases)}")

    blocks = math.ceil(context_len / block_size)
    found = _cheapest(buckets, batch, tokens, blocks)
    if found is not None:
        return found

    largest = max(buckets, key=lambda b: (b.cost, _sort_key(b)))
    raise ValueError(
        f"no {largest.phase} bucket fits batch={batch}, tokens={tokens}, "
        f"context_len={context_len} ({blocks} blocks of {block_size}); the largest is "
        f"{largest.name} (batch={largest.batch}, tokens={largest.tokens}, "
        f"context={largest.context_blocks * block_size} tokens). Split the step to fit, "
        f"or recompile with larger buckets"
    )


def _cheapest(buckets: Sequence[Bucket], batch: int, tokens: int, blocks: int) -> Bucket | None:
    fitting = [
        b for b in buckets if batch <= b.batch and tokens <= b.tokens and blocks <= b.context_blocks
    ]
    return min(fitting, key=lambda b: (b.cost, _sort_key(b))) if fitting else None


def group_rows(
    buckets: Sequence[Bucket],
    rows: Sequence[tuple[int, int]],
    *,
    block_size: int,
    depends_on: Sequence[Sequence[int]] | None = None,
) -> list[tuple[Bucket, list[int]]]:
    """Splits a step's rows into graph calls: ``[(bucket, row indices)]`` in the
    order to run them.

    ``rows[i]`` is ``(tokens, context_len)`` of row i, as for `pad_to_bucket`.
    ``depends_on[i]`` lists earlier rows whose K/V of this step row i reads (a
    prefix-cache hit on blocks another row of the step writes): those run in
    an earlier call or the same one (a graph writes every row's K/V of a layer
    before any row attends).

    Rows of similar length go together: rows are ordered by (tokens, context)
    (a dependent row no earlier than what it reads), then cut into runs that
    minimise, in this order, the padded tokens computed (prefill is compute
    bound), the number of calls, and the context blocks gathered. Every row
    must fit some bucket alone.
    """
    block_size = _positive_int(block_size, "block_size")
    n = len(rows)
    if depends_on is None:
        depends_on = [()] * n
    need = [(t, math.ceil(c / block_size)) for t, c in rows]
    key: list[tuple[int, int]] = []
    for i, (own, deps) in enumerate(zip(need, depends_on)):
        assert all(d < i for d in deps), (i, deps)
        key.append(max([own, *(key[d] for d in deps)]))
    order = sorted(range(n), key=lambda i: (key[i], i))

    most = max(b.batch for b in buckets)
    # best[j]: (cost, start of the last run, its bucket) for the first j rows of `order`.
    best: list[tuple[tuple[int, int, int], int, Bucket | None]] = [((0, 0, 0), 0, None)]
    for j in range(1, n + 1):
        choice = None
        for start in range(max(0, j - most), j):
            run = order[start:j]
            bucket = _cheapest(buckets, len(run), max(need[i][0] for i in run),
                               max(need[i][1] for i in run))
            if bucket is None:
                continue
            prev = best[start][0]
            cost = (prev[0] + bucket.cost[0], prev[1] + 1, prev[2] + bucket.cost[1])
            if choice is None or cost < choice[0]:
                choice = (cost, start, bucket)
        if choice is None:
            t, c = rows[order[j - 1]]
            pad_to_bucket(buckets, 1, t, c, block_size=block_size)  # raises: nothing fits
            raise AssertionError("unreachable")
        best.append(choice)
    groups = []
    j = n
    while j:
        _, start, bucket = best[j]
        groups.append((bucket, order[start:j]))
        j = start
    return groups[::-1]
