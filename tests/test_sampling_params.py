import dataclasses

import pytest

from aotllm.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from aotllm.runtime.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1, 0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(7, 9), top_k=-1, temperature=1, seed=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [7, 9]
    assert p.top_k == 0 and p.seed is None
    assert isinstance(p.temperature, float)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED


def test_greedy_ignores_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"n": 2, "temperature": 0.0}, "n"),
    ],
)
def test_out_of_range_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": None}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"n": True}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"stop": 3}, "stop"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_wrong_type_raises_type_error_naming_field(kwargs, field):
    with pytest.raises(TypeError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def test_boundaries_accepted():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, top_p=1.0, min_p=1.0, top_k=1,
                       min_tokens=4, max_tokens=4, logprobs=0, temperature=1e-3)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.logprobs) == (-2, 2, 1, 0)
    assert not p.is_greedy
    # As in vLLM, greedy sampling resets the filters it ignores.
    greedy = SamplingParams(temperature=0.0, top_k=1, top_p=0.5, min_p=0.5)
    assert greedy.is_greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)


def test_frozen_and_clone():
    p = SamplingParams(stop=["x"], temperature=0.7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    c = p.clone()
    assert c == p and c.stop is not p.stop
    d = p.clone(top_k=-1, seed=5)
    assert d.top_k == 0 and d.seed == 5 and p.seed is None
    with pytest.raises(ValueError, match="top_p"):
        p.clone(top_p=2.0)


def test_output_reprs_and_finished():
    lp = {5: Logprob(-0.25, rank=1, decoded_token="a")}
    c = CompletionOutput(0, "hi", [5], -0.25, [lp], finish_reason="stop", stop_reason=5)
    assert c.finished() and not CompletionOutput(0, "", [], None, None).finished()
    assert repr(c) == (
        "CompletionOutput(index=0, text='hi', token_ids=[5], cumulative_logprob=-0.25, "
        "logprobs=[{5: Logprob(logprob=-0.25, rank=1, decoded_token='a')}], "
        "finish_reason=stop, stop_reason=5)"
    )
    r = RequestOutput("r1", "p", [1, 2], None, [c], finished=True)
    assert repr(r).startswith("RequestOutput(request_id=r1, prompt='p', prompt_token_ids=[1, 2], ")
    assert "outputs=[CompletionOutput(index=0" in repr(r) and repr(r).endswith(
        "finished=True, metrics=None, num_cached_tokens=None)")
