"""Engine logprobs in the two OpenAI shapes (completions and chat)."""

from __future__ import annotations

from typing import Any

from aotllm.runtime.outputs import Logprob

# JSON has no -inf; OpenAI and vLLM clamp to this.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, _FLOOR)


def _text(tokenizer, token_id: int, lp: Logprob) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id])


class CompletionLogprobs:
    """Accumulates completions-style logprobs over deltas (text offsets continue)."""

    def __init__(self, tokenizer, start_offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = start_offset

    def build(self, token_ids: list[int], steps: list[dict[int, Logprob]]) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for tid, step in zip(token_ids, steps):
            text = _text(self.tokenizer, tid, step[tid])
            tokens.append(text)
            token_logprobs.append(_lp(step[tid].logprob))
            # The sampled token and the top-k, as vLLM reports them. Tokens
            # that decode alike (byte pieces all show as U+FFFD) share a key:
            # the more likely one keeps it.
            entries: dict[str, float] = {}
            for t, lp in sorted(step.items(), key=lambda item: -item[1].logprob):
                entries.setdefault(_text(self.tokenizer, t, lp), _lp(lp.logprob))
            top.append(entries)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top}


def chat_logprobs(tokenizer, token_ids: list[int], steps: list[dict[int, Logprob]],
                  top_k: int) -> dict[str, Any]:
    content = []
    for tid, step in zip(token_ids, steps):
        text = _text(tokenizer, tid, step[tid])
        ranked = sorted((lp.rank or 0, t, lp) for t, lp in step.items()
                        if lp.rank is not None and lp.rank <= top_k)
        content.append({
            "token": text,
            "logprob": _lp(step[tid].logprob),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (s := _text(tokenizer, t, lp)), "logprob": _lp(lp.logprob),
                 "bytes": list(s.encode("utf-8"))}
                for _, t, lp in ranked
            ],
        })
    return {"content": content}
