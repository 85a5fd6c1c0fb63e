import math

import pytest
import torch

from aotllm.runtime.sampler import Sampler, SamplingRow, _apply_penalties, make_generator
from aotllm.runtime.sampling_params import SamplingParams

EOS = 0


def row(params: SamplingParams, prompt=(1, 2), output=(), generator=None) -> SamplingRow:
    if params.seed is not None and generator is None:
        generator = make_generator(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator)


def repeat_rows(params: SamplingParams, n: int) -> list[SamplingRow]:
    return [row(params) for _ in range(n)]


def test_greedy_is_argmax_any_dtype():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = Sampler({EOS})(logits.to(dtype), repeat_rows(SamplingParams(temperature=0.0), 6))
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()
        assert out.logprobs == [None] * 6


def test_top_k_1_is_greedy_at_temperature_1():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 40, generator=g) * 0.1  # flat, so a real draw would vary
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: argmax takes the first
    rows = repeat_rows(SamplingParams(temperature=1.0, top_k=1), 16) + repeat_rows(
        SamplingParams(temperature=1.0, top_k=1, seed=4), 16
    )
    out = Sampler({EOS})(logits, rows, generator=g)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 7


def _seeded_run(position: int, batch: int, steps: int, others_seed: int) -> list[int]:
    """Tokens of a seed=1234 row placed at `position` in a batch of `batch` rows."""
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, repetition_penalty=1.1)
    gen = make_generator(1234)
    shared = torch.Generator().manual_seed(others_seed)
    other_params = [
        SamplingParams(),
        SamplingParams(seed=others_seed, top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.1, frequency_penalty=0.5),
    ]
    others = [row(p) for p in other_params][: batch - 1]
    target_out: list[int] = []
    sampler = Sampler({EOS})
    for step in range(steps):
        target_logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(step))
        rows = list(others)
        rows.insert(position, row(target, output=target_out, generator=gen))
        logits = torch.randn(len(rows), 64, generator=shared)
        logits[position] = target_logits[0]
        token = sampler(logits, rows, generator=shared).token_ids[position]
        target_out.append(token)
    return target_out


def test_seeded_row_independent_of_batch():
    alone = _seeded_run(position=0, batch=1, steps=8, others_seed=0)
    assert len(set(alone)) > 1  # the row really samples
    for position, others_seed in ((0, 1), (2, 2), (4, 3)):
        assert _seeded_run(position, batch=5, steps=8, others_seed=others_seed) == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, 100)  # uniform: 1% chance two seeds agree on a token
    firsts = [Sampler({EOS})(logits, [row(SamplingParams(seed=s))]).token_ids[0] for s in range(12)]
    assert len(set(firsts)) >= 6


def test_unseeded_rows_follow_passed_generator():
    logits = torch.zeros(20, 100)
    rows = repeat_rows(SamplingParams(), 20)
    a = Sampler({EOS})(logits, rows, generator=torch.Generator().manual_seed(7)).token_ids
    b = Sampler({EOS})(logits, rows, generator=torch.Generator().manual_seed(7)).token_ids
    assert a == b and len(set(a)) > 5


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.65), {0, 1}),  # mass before token 2 is 0.7 >= 0.65
        (SamplingParams(top_p=0.35), {0}),
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
        (SamplingParams(min_p=0.3, top_k=4, top_p=0.8), {0, 1}),  # 0.4/.85, .3/.85 -> .82
        (SamplingParams(top_k=3, top_p=0.9), {0, 1, 2}),
    ],
)
def test_filters_never_return_filtered_tokens(params, allowed):
    n = 3000
    logits = PROBS.log().expand(n, -1).clone()
    out = Sampler({EOS})(logits, repeat_rows(params, n), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5)
    assert set(torch.nonzero(counts).flatten().tolist()) == allowed
    # The survivors keep their relative odds (loose: 3000 draws).
    kept = sorted(allowed)
    expected = PROBS[kept] / PROBS[kept].sum()
    assert torch.allclose(counts[kept].float() / n, expected, atol=0.05)


def test_only_one_finite_token_has_no_nan():
    logits = torch.full((4, 10), -float("inf"))
    logits[:, 6] = 0.0
    params = [SamplingParams(), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
              SamplingParams(seed=3, top_k=5, temperature=0.01)]
    out = Sampler({EOS})(logits, [row(p) for p in params])
    assert out.token_ids == [6, 6, 6, 6]


def test_penalties_hand_made():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    rows = [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 3], output=[1, 1, 2])]
    _apply_penalties(logits, rows)
    # Seen tokens 0..3: positives halved, negatives doubled; 4 and 5 unseen.
    assert logits.tolist() == [[1.0, -4.0, 0.5, -2.0, 0.5, 3.0]]

    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    rows = [row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
                prompt=[0, 3], output=[1, 1, 2])]
    _apply_penalties(logits, rows)
    # Output tokens only: 1 appears twice (-1.0 - 0.25), 2 once (-0.5 - 0.25).
    assert logits.tolist() == [[2.0, -3.25, 0.25, -1.0, 0.5, 3.0]]


def test_penalty_changes_greedy_choice_and_leaves_other_rows_alone():
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]] * 2)
    rows = [row(SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt=[3], output=[1]),
            row(SamplingParams(temperature=0.0), prompt=[3], output=[1])]
    assert Sampler({EOS})(logits, rows).token_ids == [2, 1]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])  # EOS, then stop id 1, then token 2
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    sampler = Sampler({EOS})
    assert sampler(logits, [row(params, output=[3])]).token_ids == [2]
    assert sampler(logits, [row(params, output=[3, 3])]).token_ids == [0]
    # Sampled rows too: EOS must never appear while masked.
    random = SamplingParams(min_tokens=1)
    out = sampler(torch.zeros(200, 4), repeat_rows(random, 200))
    assert EOS not in out.token_ids


def test_logprobs_topk_plus_sampled_with_ranks():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]] * 3)
    ref = torch.log_softmax(logits[0], -1)
    # The penalty pushes the greedy choice to token 3, raw rank 4.
    steer = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=100.0)
    rows = [row(steer, prompt=[0, 1, 2]),
            row(SamplingParams(temperature=0.0, logprobs=0)),
            row(SamplingParams(temperature=0.0))]
    out = Sampler({EOS})(logits, rows)
    assert out.token_ids == [3, 0, 0]
    first = out.logprobs[0]
    assert list(first) == [3, 0, 1]
    assert [first[t].rank for t in (3, 0, 1)] == [4, 1, 2]
    for t, lp in first.items():
        assert math.isclose(lp.logprob, ref[t].item(), rel_tol=1e-6)
    assert out.logprobs[1] == {0: out.logprobs[1][0]} and out.logprobs[1][0].rank == 1
    assert out.logprobs[2] is None


def test_logprobs_sampled_inside_topk_keeps_k_entries():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    out = Sampler({EOS})(logits, [row(SamplingParams(temperature=0.0, logprobs=3))])
    assert [(t, lp.rank) for t, lp in out.logprobs[0].items()] == [(0, 1), (1, 2), (2, 3)]


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2, 0.8, -0.2])
    params = SamplingParams(temperature=0.7)
    expected = torch.softmax(logits / 0.7, -1)
    n = 4000
    out = Sampler({EOS})(logits.expand(n, -1).clone(), repeat_rows(params, n),
                         generator=torch.Generator().manual_seed(0))
    # df = 7: 40 is far beyond the p = 1e-6 critical value; a wrong
    # temperature (e.g. 1.0 here) gives a statistic in the hundreds.
    assert _chi_square(out.token_ids, expected) < 40
    assert _chi_square(out.token_ids, torch.softmax(logits, -1)) > 40
    # The per-row seeded path draws from the same distribution.
    seeded = [row(params.clone(seed=s)) for s in range(1500)]
    out = Sampler({EOS})(logits.expand(1500, -1).clone(), seeded)
    assert _chi_square(out.token_ids, expected) < 40


def test_bad_inputs():
    sampler = Sampler({EOS})
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(2, 5), [row(SamplingParams())])
    with pytest.raises(ValueError, match="generator"):
        sampler(torch.zeros(1, 5), [SamplingRow(SamplingParams(seed=1), [], [], None)])
    assert sampler(torch.zeros(0, 5), []).token_ids == []
