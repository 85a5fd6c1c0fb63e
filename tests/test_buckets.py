"""The bucket table: defaults, overrides, validation, padding."""

from __future__ import annotations

import pytest

from aotllm.graphs.buckets import Bucket, BucketPlan, group_rows, pad_to_bucket, plan_buckets


def _tokens(plan: BucketPlan) -> list[int]:
    return sorted({b.tokens for b in plan.prefill})


def _prefill(plan: BucketPlan) -> set[tuple[int, int, int]]:
    """(batch, tokens, context in tokens) of every prefill bucket."""
    return {(b.batch, b.tokens, b.context_blocks * plan.block_size) for b in plan.prefill}


def _batches(plan: BucketPlan) -> list[int]:
    return sorted({b.batch for b in plan.decode})


def _contexts(plan: BucketPlan) -> list[int]:
    return sorted({b.context_blocks * plan.block_size for b in plan.decode})


# -- defaults ---------------------------------------------------------------


def test_defaults_typical_config() -> None:
    plan = plan_buckets(max_model_len=4096, max_num_seqs=32, block_size=16)
    assert _tokens(plan) == [16, 64, 256, 1024, 2048]
    # Every T at the full context (a later chunk of a long prompt attends to
    # everything before it) and, where that is <= 1/4 of it, at the narrowest
    # context holding T tokens; batch 4 at the narrow context for B*T <= 2048.
    assert _prefill(plan) == {
        (1, 16, 256), (1, 16, 4096), (1, 64, 256), (1, 64, 4096),
        (1, 256, 256), (1, 256, 4096), (1, 1024, 1024), (1, 1024, 4096), (1, 2048, 4096),
        (4, 16, 256), (4, 64, 256), (4, 256, 256),
    }
    assert _batches(plan) == [1, 2, 4, 8, 16, 32]
    assert _contexts(plan) == [256, 1024, 4096]
    assert {b.tokens for b in plan.decode} == {1}
    assert len(plan.decode) == 6 * 3  # the full cross product
    assert plan.max_prefill_tokens == 2048
    assert plan.max_decode_batch == 32
    assert plan.buckets == plan.prefill + plan.decode


def test_defaults_small_model_len_not_block_aligned() -> None:
    plan = plan_buckets(max_model_len=100, max_num_seqs=3, block_size=16)
    assert _tokens(plan) == [16, 64, 100]  # the cap is always included
    assert _batches(plan) == [1, 2, 3]
    # 100 tokens need 7 blocks of 16: the one context bucket covers them.
    assert _contexts(plan) == [112]
    # One context: every prefill bucket has it; B=3 fits only T=16 (48 <= 100).
    assert _prefill(plan) == {(1, 16, 112), (1, 64, 112), (1, 100, 112), (3, 16, 112)}


def test_defaults_large_block_size() -> None:
    plan = plan_buckets(max_model_len=8192, max_num_seqs=20, block_size=128)
    assert _tokens(plan) == [128, 512, 2048]
    assert _batches(plan) == [1, 2, 4, 8, 16, 20]
    assert _contexts(plan) == [256, 1024, 4096, 8192]


def test_defaults_single_sequence() -> None:
    plan = plan_buckets(max_model_len=16, max_num_seqs=1, block_size=16)
    assert _tokens(plan) == [16]
    assert [b.name for b in plan.prefill] == ["prefill_b1_t16_c1"]
    assert [b.name for b in plan.decode] == ["decode_b1_t1_c1"]


@pytest.mark.parametrize(
    ("max_model_len", "before", "after"),
    [(2048, 5 + 4 * 3, 11 + 4 * 3), (8192, 5 + 4 * 4, 12 + 4 * 4)],
)
def test_default_graph_counts(max_model_len: int, before: int, after: int) -> None:
    """The README's figures (max_num_seqs 8, block 16). Before: one B=1
    full-width prefill bucket per T."""
    plan = plan_buckets(max_model_len, 8, 16)
    assert len(plan.buckets) == after
    old = plan_buckets(max_model_len, 8, 16, prefill_batch_sizes=[1])
    assert len({b.tokens for b in old.prefill}) + len(old.decode) == before


def test_prefill_batch_sizes_override() -> None:
    plan = plan_buckets(512, 8, 16, prefill_buckets=[16, 64, 256], context_buckets=[128, 512],
                        prefill_batch_sizes=[1, 2, 8])
    # B*T <= 256, at the narrow context (128 tokens) where it is <= 512 / 4.
    batched = {(b, t, c) for b, t, c in _prefill(plan) if b > 1}
    assert batched == {(2, 16, 128), (2, 64, 128), (8, 16, 128)}
    assert plan_buckets(512, 8, 16, prefill_batch_sizes=[1]).prefill == tuple(
        b for b in plan_buckets(512, 8, 16).prefill if b.batch == 1)


def test_buckets_sorted_and_unique() -> None:
    plan = plan_buckets(max_model_len=2048, max_num_seqs=256, block_size=16)
    for phase in (plan.prefill, plan.decode):
        keys = [(b.batch, b.tokens, b.context_blocks) for b in phase]
        assert keys == sorted(keys)
    names = [b.name for b in plan.buckets]
    assert len(names) == len(set(names))


# -- overrides --------------------------------------------------------------


def test_overrides_are_sorted_and_deduped() -> None:
    plan = plan_buckets(
        max_model_len=1000,
        max_num_seqs=8,
        block_size=16,
        prefill_buckets=[512, 32, 512],
        decode_batch_sizes=[8, 1, 8],
        context_buckets=[1008, 512, 512],
    )
    assert _tokens(plan) == [32, 512]
    assert _batches(plan) == [1, 8]
    assert _contexts(plan) == [512, 1008]
    assert plan.prefill[0].context_blocks == 63  # ceil(1000 / 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefill_buckets": [0, 64]}, "positive integer"),
        ({"prefill_buckets": [4096]}, "above max_model_len"),
        ({"prefill_buckets": []}, "must not be empty"),
        ({"decode_batch_sizes": [1, 4]}, "must equal max_num_seqs=8"),
        ({"decode_batch_sizes": [1, 16]}, "must equal max_num_seqs=8"),
        ({"context_buckets": [100, 2048]}, "not multiples of block_size=16"),
        ({"context_buckets": [256, 1024]}, r"must be 2048 \(max_model_len=2048"),
        ({"context_buckets": [256, 4096]}, r"must be 2048 \(max_model_len=2048"),
        ({"max_model_len": 0}, "max_model_len must be a positive integer"),
        ({"prefill_batch_sizes": [2, 4]}, "must include 1"),
        ({"prefill_batch_sizes": [1, 16]}, "above max_num_seqs=8"),
        ({"prefill_batch_sizes": [1, 4], "prefill_buckets": [16]}, r"\[4\] times the smallest"),
    ],
)
def test_override_validation(kwargs: dict, match: str) -> None:
    args = {"max_model_len": 2048, "max_num_seqs": 8, "block_size": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        plan_buckets(**args)


@pytest.mark.parametrize("bad", [[1.5], ["16"], [True], "16"])
def test_override_type_errors(bad: object) -> None:
    with pytest.raises(TypeError, match="positive integer"):
        plan_buckets(2048, 8, 16, prefill_buckets=bad)  # type: ignore[arg-type]


def test_context_override_rounds_to_block_multiple_of_model_len() -> None:
    plan = plan_buckets(100, 1, 16, context_buckets=[112])
    assert _contexts(plan) == [112]
    with pytest.raises(ValueError, match=r"must be 112 \(max_model_len=100"):
        plan_buckets(100, 1, 16, context_buckets=[96])


# -- Bucket ------------------------------------------------------------------


def test_bucket_name_is_stable_and_file_safe() -> None:
    assert Bucket("prefill", 1, 128, 256).name == "prefill_b1_t128_c256"
    assert Bucket("decode", 8, 1, 16).name == "decode_b8_t1_c16"
    plan = plan_buckets(4096, 64, 16)
    for b in plan.buckets:
        assert b.name.replace("_", "").isalnum()
        assert Bucket.from_dict(b.to_dict()) == b


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        (("mixed", 1, 1, 1), ValueError),
        (("decode", 2, 4, 1), ValueError),
        (("prefill", 0, 16, 1), ValueError),
        (("prefill", 1, 16.0, 1), TypeError),
    ],
)
def test_bucket_validation(args: tuple, exc: type) -> None:
    with pytest.raises(exc):
        Bucket(*args)


def test_plan_round_trip() -> None:
    plan = plan_buckets(4096, 24, 32, prefill_buckets=[64, 512])
    again = BucketPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.prefill == plan.prefill and again.decode == plan.decode


def test_plan_rejects_wrong_phase() -> None:
    with pytest.raises(ValueError, match="decode buckets"):
        BucketPlan(16, 256, (Bucket("prefill", 1, 16, 16),), (Bucket("prefill", 1, 32, 16),))


# -- pad_to_bucket ----------------------------------------------------------

PLAN = plan_buckets(max_model_len=4096, max_num_seqs=32, block_size=16)


@pytest.mark.parametrize(
    ("batch", "context_len", "expected"),
    [
        (1, 1, "decode_b1_t1_c16"),
        (1, 256, "decode_b1_t1_c16"),
        (1, 257, "decode_b1_t1_c64"),  # one token over a block boundary
        (3, 100, "decode_b4_t1_c16"),
        (9, 1024, "decode_b16_t1_c64"),
        (17, 4000, "decode_b32_t1_c256"),
        (32, 4096, "decode_b32_t1_c256"),
    ],
)
def test_pad_decode(batch: int, context_len: int, expected: str) -> None:
    assert pad_to_bucket(PLAN.decode, batch, 1, context_len, block_size=16).name == expected
    assert PLAN.bucket_for("decode", batch, 1, context_len).name == expected


@pytest.mark.parametrize(
    ("tokens", "context_len", "expected"),
    [
        (1, 1, "prefill_b1_t16_c16"),
        (16, 16, "prefill_b1_t16_c16"),
        (17, 17, "prefill_b1_t64_c16"),
        (16, 257, "prefill_b1_t16_c256"),  # a chunk after 241 cached tokens
        (300, 300, "prefill_b1_t1024_c64"),
        (300, 4000, "prefill_b1_t1024_c256"),
        (2048, 4096, "prefill_b1_t2048_c256"),
    ],
)
def test_pad_prefill(tokens: int, context_len: int, expected: str) -> None:
    assert PLAN.bucket_for("prefill", 1, tokens, context_len).name == expected


def test_pad_prefers_fewer_tokens_then_narrower_context() -> None:
    buckets = [
        Bucket("decode", 8, 1, 4),
        Bucket("decode", 4, 1, 64),
        Bucket("decode", 4, 1, 16),
    ]
    # B*T decides first: b4 beats b8 even though b8 has the narrower table.
    assert pad_to_bucket(buckets, 3, 1, 10, block_size=16).name == "decode_b4_t1_c16"
    assert pad_to_bucket(buckets, 5, 1, 10, block_size=16).name == "decode_b8_t1_c4"


@pytest.mark.parametrize(
    ("phase", "batch", "tokens", "context_len"),
    [
        ("decode", 33, 1, 10),
        ("decode", 1, 1, 4097),
        ("prefill", 1, 2049, 2049),
        ("prefill", 5, 16, 16),
        ("prefill", 2, 16, 257),  # batched buckets have the narrow context only
    ],
)
def test_pad_raises_when_nothing_fits(
    phase: str, batch: int, tokens: int, context_len: int
) -> None:
    largest = {"decode": "decode_b32_t1_c256", "prefill": "prefill_b1_t2048_c256"}[phase]
    with pytest.raises(ValueError, match=f"batch={batch}, tokens={tokens}.*largest is {largest}"):
        PLAN.bucket_for(phase, batch, tokens, context_len)


def test_pad_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="one phase"):
        pad_to_bucket(PLAN.buckets, 1, 1, 1, block_size=16)
    with pytest.raises(ValueError, match="at least one bucket"):
        pad_to_bucket([], 1, 1, 1, block_size=16)
    with pytest.raises(ValueError, match="smaller than tokens"):
        pad_to_bucket(PLAN.prefill, 1, 64, 10, block_size=16)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        pad_to_bucket(PLAN.decode, 0, 1, 10, block_size=16)


# -- group_rows ---------------------------------------------------------------


PLAN_B124 = plan_buckets(max_model_len=4096, max_num_seqs=32, block_size=16,
                         prefill_batch_sizes=[1, 2, 4])


def _groups(rows, depends_on=None, plan=PLAN_B124):
    return [(b.name, members) for b, members in
            group_rows(plan.prefill, rows, block_size=16, depends_on=depends_on)]


def test_group_a_burst_of_equal_prompts_into_one_call() -> None:
    assert _groups([(128, 128)] * 4) == [("prefill_b4_t256_c16", [0, 1, 2, 3])]
    assert _groups([(10, 10)] * 6) == [("prefill_b2_t16_c16", [0, 1]),
                                       ("prefill_b4_t16_c16", [2, 3, 4, 5])]
    # Without a B=2 bucket, two one-row calls compute fewer tokens than a
    # half-empty B=4 call (prefill is compute bound).
    assert _groups([(10, 10)] * 6, plan=PLAN) == [
        ("prefill_b1_t16_c16", [0]), ("prefill_b1_t16_c16", [1]),
        ("prefill_b4_t16_c16", [2, 3, 4, 5])]


def test_group_similar_lengths_together() -> None:
    # Two short and two long prompts, interleaved: each pair shares a call
    # instead of the short ones padding to the long ones' 256 tokens.
    rows = [(200, 200), (10, 10), (220, 220), (12, 12)]
    assert _groups(rows) == [("prefill_b2_t16_c16", [1, 3]), ("prefill_b2_t256_c16", [0, 2])]


def test_group_fewest_padded_tokens_first() -> None:
    # Three 20-token prompts: 3 x T64 (192 tokens) beat one B4 x T64 (256).
    assert _groups([(20, 20)] * 3, plan=PLAN) == [("prefill_b1_t64_c16", [0]),
                                       ("prefill_b1_t64_c16", [1]), ("prefill_b1_t64_c16", [2])]


def test_group_wide_context_runs_alone() -> None:
    # A 16-token chunk after 984 cached tokens needs the full-width table;
    # the fresh prompts still batch.
    assert _groups([(16, 1000), (16, 16), (16, 16)]) == [
        ("prefill_b2_t16_c16", [1, 2]), ("prefill_b1_t16_c256", [0])]


def test_group_keeps_a_prefix_hit_after_its_writer() -> None:
    # Row 1 hits blocks row 0 writes this step: it may share row 0's call or
    # run later, never earlier, though it is the shorter one.
    assert _groups([(64, 64), (16, 80)], depends_on=[[], [0]]) == [
        ("prefill_b1_t64_c16", [0]), ("prefill_b1_t16_c16", [1])]
    groups = _groups([(64, 64), (16, 80), (10, 10)], depends_on=[[], [0], []])
    order = [i for _, members in groups for i in members]
    assert order.index(1) >= order.index(0) and order[0] == 2


def test_group_raises_when_a_row_fits_no_bucket() -> None:
    with pytest.raises(ValueError, match="no prefill bucket fits batch=1, tokens=4000"):
        _groups([(16, 16), (4000, 4000)])


def test_a_plan_from_before_prefill_contexts_still_loads_and_groups() -> None:
    """Artifacts compiled before prefill had a context and batch dimension
    record B=1, full-width prefill buckets: they load, and each row runs alone."""
    old = {"block_size": 16, "max_model_len": 2048,
           "prefill": [{"phase": "prefill", "batch": 1, "tokens": t, "context_blocks": 128}
                       for t in (16, 64, 256, 1024, 2048)],
           "decode": [{"phase": "decode", "batch": 1, "tokens": 1, "context_blocks": 128}]}
    plan = BucketPlan.from_dict(old)
    assert _groups([(10, 10), (12, 12), (100, 100)], plan=plan) == [
        ("prefill_b1_t16_c128", [0]), ("prefill_b1_t16_c128", [1]),
        ("prefill_b1_t256_c128", [2])]
