"""The bucket table: which static shapes get a compiled graph.

A bucket is ``(phase, batch B, tokens T, context blocks MAXB)``. Prefill
buckets run one sequence (B=1) and vary T; the largest T is also the chunk size
for longer prompts. Decode buckets have T=1 and are the cross product of batch
sizes and context lengths. Every bucket's block table is ``MAXB`` wide, so a
graph can attend to at most ``MAXB * block_size`` tokens.

`plan_buckets` is the one pure function that computes the table; the compiler
builds one graph per bucket, the manifest records the table, and the runtime
pads each step to the cheapest bucket that fits (`pad_to_bucket`). The
scheduler never forms a step larger than the largest bucket, so the runner
never needs an eager fallback.

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
        """What padding to this bucket costs: tokens computed first, then context width."""
        return (self.batch * self.tokens, self.context_blocks)

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


def plan_buckets(
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    prefill_buckets: Sequence[int] | None = None,
    decode_batch_sizes: Sequence[int] | None = None,
    context_buckets: Sequence[int] | None = None,
) -> BucketPlan:
    """The bucket table for one serving configuration.

    ``prefill_buckets`` are prompt-chunk lengths in tokens, ``decode_batch_sizes``
    numbers of sequences, ``context_buckets`` attention spans in tokens
    (multiples of ``block_size``). Overrides are sorted and deduplicated. The
    defaults (``None``):

    - prefill: every other power of two from 16 (or ``block_size`` if larger),
      below ``min(max_model_len, 2048)``, plus that cap;
    - decode batch sizes: 1, 2, 4, then multiples of 8, plus ``max_num_seqs``,
      all at most ``max_num_seqs``;
    - context: ``max(256, block_size)`` rounded up to a block multiple, times 4
      per step, ending at ``max_model_len`` rounded up to a block multiple.
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

    full_blocks = full_context // block_size
    return BucketPlan(
        block_size=block_size,
        max_model_len=max_model_len,
        prefill=tuple(Bucket("prefill", 1, t, full_blocks) for t in prefill),
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
    fitting = [
        b for b in buckets if batch <= b.batch and tokens <= b.tokens and blocks <= b.context_blocks
    ]
    if fitting:
        return min(fitting, key=lambda b: (b.cost, _sort_key(b)))

    largest = max(buckets, key=lambda b: (b.cost, _sort_key(b)))
    raise ValueError(
        f"no {largest.phase} bucket fits batch={batch}, tokens={tokens}, "
        f"context_len={context_len} ({blocks} blocks of {block_size}); the largest is "
        f"{largest.name} (batch={largest.batch}, tokens={largest.tokens}, "
        f"context={largest.context_blocks * block_size} tokens). Split the step to fit, "
        f"or recompile with larger buckets"
    )
