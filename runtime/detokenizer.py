"""Incremental detokenization and stop strings for one request (vLLM semantics).

Text comes from the `tokenizers` library's `DecodeStream`, which decodes only a
small window of recent tokens per step and holds back tokens until their bytes
form complete UTF-8, so a character split across tokens never shows up as
U+FFFD and the cost per token does not grow with the output length.
"""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens the stream is primed with, so the first output tokens decode
# as they would inside the full text (e.g. a Metaspace "▁" becomes a leading
# space instead of being stripped as the start of the text). Same window as vLLM.
_MIN_PROMPT_CONTEXT = 4
_MAX_PROMPT_CONTEXT = 23
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text as they arrive."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | str | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(backend, Tokenizer):
            raise TypeError(
                "IncrementalDetokenizer needs a fast tokenizer (a transformers tokenizer "
                f"backed by the `tokenizers` library); got {type(tokenizer).__name__}"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings; got {s!r}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0; got {min_tokens}")

        self._backend = backend
        self._skip = skip_special_tokens
        self._stops = stops
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        # Only a stop string that will be cut from the output can make already
        # decoded text disappear, so only then must streaming hold text back.
        self._held_stops = [] if include_stop_str_in_output else [s for s in stops if len(s) > 1]

        context = self._prompt_context(list(prompt_token_ids))
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        # Ids fed since the stream last produced text (an unfinished UTF-8
        # sequence or skipped special tokens), and the ids of that last text,
        # which give the pending ones their context when flushed at the end.
        self._pending_ids: list[int] = []
        self._context_ids: list[int] = context

        # vLLM: a fast tokenizer's decoder may put a space between consecutive
        # added tokens; without spaces_between_special_tokens the second one is
        # emitted as its bare content.
        self._added_tokens: dict[int, str] | None = None
        self._last_was_added = False
        if not (skip_special_tokens or spaces_between_special_tokens):
            added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
            self._added_tokens = added or None

        self._text = ""
        self._num_output_tokens = 0
        self._stop_reason: str | None = None
        self._finished = False  # a stop string matched, or the end was flushed
        self._emitted = 0  # characters of _text handed out by get_next_output_text(delta=True)

    @property
    def output_text(self) -> str:
        return self._text

    def update(self, new_token_ids: Iterable[int], stop_terminated: bool = False) -> str | None:
        """Append tokens; return the stop string that matched, or None.

        On a match the request must finish with finish_reason "stop" and
        stop_reason set to the returned string; tokens after the one that
        completed the match are ignored. Stop strings are checked after every
        token, so one call with several tokens behaves like several calls.

        `stop_terminated`: the last token is the EOS / stop token that ends the
        request; as in vLLM its text is left out unless include_stop_str_in_output.
        """
        if self._finished:
            raise RuntimeError("update() called on a detokenizer whose request already finished")
        ids = list(new_token_ids)
        if stop_terminated and ids and not self._include_stop:
            ids.pop()
            self._num_output_tokens += 1
        for token_id in ids:
            self._num_output_tokens += 1
            start = len(self._text)
            self._text += self._decode_next(token_id)
            if self._stops and len(self._text) > start and self._num_output_tokens > self._min_tokens:
                matched = self._check_stop(start)
                if matched is not None:
                    return matched
        return None

    def get_next_output_text(self, delta: bool, finished: bool = False) -> str:
        """The text so far (delta=False) or the part new since the last delta call.

        While the request runs, trailing characters that could still turn out
        to be the start of a stop string are held back (bytes of an unfinished
        character never reach the text at all). Pass finished=True once the
        request has ended for any reason: everything final is then released,
        including bytes that will now never complete a character (as U+FFFD,
        exactly as a full decode renders them).
        """
        if finished:
            self._flush()
        end = len(self._text) if self._finished else len(self._text) - self._holdback()
        if not delta:
            return self._text[:end]
        if end <= self._emitted:
            return ""
        new_text = self._text[self._emitted : end]
        self._emitted = end
        return new_text

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (vLLM's Logprob.decoded_token)."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        if not prompt:
            return []
        window = prompt[-_MAX_PROMPT_CONTEXT:]
        if self._backend.decode(window, skip_special_tokens=self._skip).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character. Its missing bytes would come
            # from the output, and the text of a character that is part prompt,
            # part output belongs to neither; decode the output on its own.
            return []
        # Prefer the shortest suffix that starts on a character boundary.
        for n in range(min(_MIN_PROMPT_CONTEXT, len(prompt)), len(window) + 1):
            suffix = prompt[-n:]
            if _REPLACEMENT_CHAR not in self._backend.decode(suffix, skip_special_tokens=self._skip):
                return suffix
        return window

    def _decode_next(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception as exc:  # the library raises a bare Exception for this
            if "Invalid prefix" not in str(exc):
                raise
            # Decoding with one more token changed earlier text (rare; depends on
            # the decoder). Like vLLM, restart the stream without context.
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            self._pending_ids, self._context_ids = [], []
            piece = self._stream.step(self._backend, token_id)
        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_was_added:
                piece = content
            self._last_was_added = content is not None
        self._pending_ids.append(token_id)
        if piece is None:
            return ""
        self._context_ids, self._pending_ids = self._pending_ids, []
        return piece

    def _check_stop(self, new_start: int) -> str | None:
        """Find the earliest stop string that ends in text from `new_start` on."""
        best: tuple[int, str] | None = None
        for s in self._stops:
            # Matches ending before new_start were looked for on earlier tokens.
            idx = self._text.find(s, max(0, new_start - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self._text = self._text[: idx + len(s)] if self._include_stop else self._text[:idx]
        self._stop_reason = s
        self._finished = True
        return s

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if not self._held_stops:
            return 0
        text = self._text
        longest = max(len(s) for s in self._held_stops) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self._held_stops):
                return k
        return 0

    def _flush(self) -> None:
        if self._finished:
            return
        self._finished = True
        if not self._pending_ids:
            return
        context = self._context_ids
        before = self._backend.decode(context, skip_special_tokens=self._skip)
        after = self._backend.decode(context + self._pending_ids, skip_special_tokens=self._skip)
        if after.startswith(before):
            self._text += after[len(before) :]
        else:
            self._text += self._backend.decode(self._pending_ids, skip_special_tokens=self._skip)
        self._pending_ids = []
