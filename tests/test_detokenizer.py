"""Incremental detokenization and stop strings against full decodes of tiny trained tokenizers."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aotllm.runtime.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
SPECIALS = ["<|eos|>", "<|pad|>", "<|im_start|>"]

# A few KB of mixed-script text. The vocabulary is small, so rare multi-byte
# characters (most emoji, some CJK) stay split across several byte-level tokens.
_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Voilà un café crème très agréable; naïve façade, garçon, déjà vu, œuvre, où est l'hôtel?",
    "Grüße aus München! Die Straße ist schön, die Bäume sind grün und Übermut tut selten gut.",
    "El niño pidió una piña y un jalapeño; mañana será otro día en la montaña, señor.",
    "今日はいい天気ですね。東京の桜が咲いています。日本語のテキストを少し書きます。",
    "你好，世界！我们正在测试增量解码器。中文字符需要三个字节，表情符号需要四个字节。",
    "한국어 문장도 조금 있습니다. 안녕하세요, 반갑습니다.",
    "Emoji time: 😀 😃 😄 😁 🎉 🚀 🌍 🍕 👍🏽 ❤️ ✨ 🔥 🤖 and a family 👨‍👩‍👧 too.",
    "Mixed: naïve 日本 😀 café 你好 🎉 Ünïcödé — “quotes” and ‘more’ … ellipsis € £ ¥ ©.",
    "Numbers 0123456789, symbols #$%&*()[]{}<>|\\/~^ and tabs\tand\nnewlines\n\nhere.",
    "Streaming text must never show a replacement character for a split character.",
]
CORPUS = "\n".join(_PARAGRAPHS * 6)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=520,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_PARAGRAPHS, trainer)
    return _wrap(tok)


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: a full decode strips the first token's leading "▁"."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS], show_progress=False)
    tok.train_from_iterator(_PARAGRAPHS[:4], trainer)
    return _wrap(tok)


@pytest.fixture(scope="module")
def corpus_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return tokenizer.encode(CORPUS)


def _feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None):
    """Feed ids in chunks (random sizes 1-3 with an rng, else one by one); yield (chunk, result)."""
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        chunk = ids[i : i + n]
        i += n
        yield chunk, detok.update(chunk)


def _aligned_windows(tokenizer, corpus_ids, rng, count, max_len=40):
    """Random windows that start and end on character boundaries (no U+FFFD in their decode)."""
    found = []
    while len(found) < count:
        start = rng.randrange(1, len(corpus_ids) - 2)
        end = min(len(corpus_ids), start + rng.randint(1, max_len))
        window = corpus_ids[start:end]
        prompt = corpus_ids[max(0, start - 30) : start]
        if FFFD not in tokenizer.decode(prompt) + tokenizer.decode(window):
            found.append((prompt, window))
    return found


def test_tokenizer_splits_characters(tokenizer):
    """Guards the other tests: the trained vocabulary really splits characters across tokens."""
    ids = tokenizer.encode("🤖 👨‍👩‍👧 反 ©")
    assert any(FFFD in tokenizer.decode([i]) for i in ids)


def test_incremental_matches_full_decode_on_aligned_windows(tokenizer, corpus_ids):
    rng = random.Random(0)
    split_seen = 0
    for prompt, window in _aligned_windows(tokenizer, corpus_ids, rng, 250):
        detok = IncrementalDetokenizer(tokenizer, prompt)
        streamed = ""
        for _chunk, stop in _feed(detok, window, rng):
            assert stop is None
            assert FFFD not in detok.output_text
            delta = detok.get_next_output_text(delta=True)
            assert FFFD not in delta
            streamed += delta
        streamed += detok.get_next_output_text(delta=True, finished=True)
        expected = tokenizer.decode(window, skip_special_tokens=True)
        assert detok.output_text == expected
        assert streamed == expected
        split_seen += sum(FFFD in tokenizer.decode([t]) for t in window)
    assert split_seen > 50


def test_incremental_matches_full_decode_on_arbitrary_windows(tokenizer, corpus_ids):
    """Windows cut anywhere, even inside a character: the finished text equals a full decode."""
    rng = random.Random(1)
    for _ in range(250):
        start = rng.randrange(0, len(corpus_ids) - 1)
        window = corpus_ids[start : start + rng.randint(1, 40)]
        detok = IncrementalDetokenizer(tokenizer, corpus_ids[max(0, start - 30) : start])
        for _chunk, _stop in _feed(detok, window, rng):
            pass
        final = detok.get_next_output_text(delta=False, finished=True)
        assert final == detok.output_text == tokenizer.decode(window)


def test_unfinished_character_is_held_until_complete_then_flushed_at_end(tokenizer):
    emoji_ids = tokenizer.encode(" 🤖")
    assert len(emoji_ids) >= 2 and FFFD in tokenizer.decode(emoji_ids[:-1])
    head = tokenizer.encode("ok")
    detok = IncrementalDetokenizer(tokenizer, [])
    detok.update(head + emoji_ids[:-1])
    assert detok.output_text == "ok"
    assert detok.get_next_output_text(delta=True) == "ok"
    detok.update(emoji_ids[-1:])
    assert detok.get_next_output_text(delta=True) == " 🤖"

    # Length-truncated mid-character: the orphan bytes come out at the end as a full decode shows them.
    cut = IncrementalDetokenizer(tokenizer, [])
    cut.update(head + emoji_ids[:-1])
    assert cut.get_next_output_text(delta=True) == "ok"
    tail = cut.get_next_output_text(delta=True, finished=True)
    assert "ok" + tail == tokenizer.decode(head + emoji_ids[:-1])
    assert tail.endswith(FFFD)


def test_prompt_context_keeps_leading_space(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt, out = tok.encode("Pack my box"), tok.encode(" with five dozen")
    assert tok.decode(out) == "with five dozen"  # decoded alone, the space is lost
    detok = IncrementalDetokenizer(tok, prompt)
    for _ in _feed(detok, out):
        pass
    full = tok.decode(prompt + out)
    assert detok.output_text == full[len(tok.decode(prompt)) :] == " with five dozen"
    # Without a prompt there is nothing to attach a space to.
    alone = IncrementalDetokenizer(tok, [])
    alone.update(out)
    assert alone.output_text == "with five dozen"


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("ab 🤖 cd")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(FFFD))
    detok = IncrementalDetokenizer(tokenizer, ids[:cut])
    detok.update(ids[cut:])
    assert detok.get_next_output_text(delta=False, finished=True) == tokenizer.decode(ids[cut:])


def test_skip_special_tokens(tokenizer):
    eos, pad = tokenizer.convert_tokens_to_ids(["<|eos|>", "<|pad|>"])
    ids = tokenizer.encode("Hello 世界") + [eos, eos, pad] + tokenizer.encode(" more 😀") + [eos]
    for skip in (True, False):
        for spaces in (True, False):
            detok = IncrementalDetokenizer(
                tokenizer, tokenizer.encode("x"), skip_special_tokens=skip, spaces_between_special_tokens=spaces
            )
            for _ in _feed(detok, ids):
                pass
            assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)
            assert ("<|eos|><|eos|><|pad|>" in detok.output_text) is not skip


def test_stop_terminated_token_is_left_out_unless_included(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("done") + [eos]
    for include, expected in ((False, "done"), (True, "done<|eos|>")):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, include_stop_str_in_output=include)
        assert detok.update(ids, stop_terminated=True) is None
        assert detok.get_next_output_text(delta=False, finished=True) == expected


def _token_texts(tokenizer, ids):
    """Per-token text as it appears in the full decode, None for tokens inside a split character."""
    texts, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:i])
        texts.append(None if FFFD in cur else cur[len(prev) :])
        if FFFD not in cur:
            prev = cur
    return texts


def _first_match_reference(tokenizer, prompt, ids, stops, include):
    """Brute force over the text after each token (from a detokenizer without stops):
    the first text that contains a stop decides; earliest start, then list order."""
    plain = IncrementalDetokenizer(tokenizer, prompt)
    for k, token_id in enumerate(ids):
        plain.update([token_id])
        text = plain.output_text
        hits = [(text.find(s), n, s) for n, s in enumerate(stops) if s in text]
        if hits:
            idx, _, s = min(hits)
            return k, s, text[: idx + len(s)] if include else text[:idx]
    return None, None, tokenizer.decode(ids)


SENTENCE = "The quick brown fox jumps over the lazy dog. Voilà 日本語 😀 🤖 café — naïve ✨ done."


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_token_boundaries(tokenizer, include):
    ids = tokenizer.encode(SENTENCE)
    texts = _token_texts(tokenizer, ids)
    full = tokenizer.decode(ids)
    checked = 0
    for i in range(len(ids) - 2):
        a, b, c = texts[i], texts[i + 1], texts[i + 2]
        shapes = []
        if a and b and len(a) >= 2 and len(b) >= 2:
            shapes.append((a[-1] + b[:-1], i + 1, b[-1]))  # starts and ends mid-token
        if a and b and c and len(a) >= 2 and len(c) >= 2:
            shapes.append((a[-1] + b + c[:1], i + 2, c[1:]))  # spans three tokens
        for stop, last, dropped in shapes:
            start = len("".join(t or "" for t in texts[:i])) + len(a) - 1
            if full.find(stop) != start:
                continue  # the string also occurs earlier; not the case being built
            detok = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
            streamed = ""
            for k, (_chunk, matched) in enumerate(_feed(detok, ids)):
                streamed += detok.get_next_output_text(delta=True)
                if k < last:
                    assert matched is None
                    continue
                assert k == last and matched == stop
                break
            expected = full[: start + len(stop)] if include else full[:start]
            # The rest of the completing token's text is not in the output.
            assert full[start + len(stop) :].startswith(dropped) and dropped
            assert detok.output_text == expected
            # Nothing streamed before the match went past what survives the cut.
            assert expected.startswith(streamed)
            assert streamed + detok.get_next_output_text(delta=True) == expected
            checked += 1
    assert checked >= 10


def test_stop_string_made_of_a_split_character(tokenizer):
    ids = tokenizer.encode("look 🤖 here")
    texts = _token_texts(tokenizer, ids)
    last = next(k for k, t in enumerate(texts) if t and "🤖" in t)
    assert texts[last - 1] is None  # the emoji really is split
    detok = IncrementalDetokenizer(tokenizer, [], stop=["🤖"])
    results = [detok.update([t]) for t in ids[: last + 1]]
    assert results[last] == "🤖" and not any(results[:last])
    assert detok.output_text == "look "


def test_earliest_stop_wins_within_one_update(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    # Both are in the text; the one that comes first in it wins, not the first listed.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lazy", "over"])
    assert detok.update(ids) == "over"
    assert detok.output_text == "The quick brown fox jumps "
    # One call with all tokens stops where token-by-token feeding would: "brown"
    # is complete before the longer stop that starts earlier.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["quick brown fox jumps", "brown"])
    assert detok.update(ids) == "brown"
    assert detok.output_text == "The quick "
    # Completed by the same token (" fox" ends both): the earlier start wins.
    fox = next(k for k in range(len(ids)) if tokenizer.decode(ids[: k + 1]).endswith("fox"))
    assert "x" not in tokenizer.decode(ids[:fox]) and "n fox" not in tokenizer.decode(ids[:fox])
    detok = IncrementalDetokenizer(tokenizer, [], stop=["x", "n fox"])
    assert detok.update(ids) == "n fox"
    assert detok.output_text == "The quick brow"


def test_stops_match_reference_on_random_windows(tokenizer, corpus_ids):
    rng = random.Random(2)
    for n, (prompt, window) in enumerate(_aligned_windows(tokenizer, corpus_ids, rng, 150)):
        text = tokenizer.decode(window)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if len(text) >= 2 and rng.random() < 0.8:
                a = rng.randrange(len(text) - 1)
                stops.append(text[a : a + rng.randint(1, 6)])
            else:
                stops.append("never-there")
        include = n % 2 == 1
        k_ref, stop_ref, text_ref = _first_match_reference(tokenizer, prompt, window, stops, include)
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=stops, include_stop_str_in_output=include)
        fed, matched = 0, None
        for chunk, matched in _feed(detok, window, rng):
            fed += len(chunk)
            if matched is not None:
                break
        assert matched == stop_ref, (stops, text)
        if k_ref is not None:  # the chunk that matched holds the token that completed the stop
            assert fed - len(chunk) <= k_ref < fed
        assert detok.get_next_output_text(delta=False, finished=True) == text_ref


def test_streaming_holds_back_only_possible_stop_prefixes(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP here"])
    detok.update(tokenizer.encode("abc"))
    assert detok.get_next_output_text(delta=True) == "abc"  # no stop can start in "abc"
    detok.update(tokenizer.encode(" ST"))
    assert detok.get_next_output_text(delta=True) == " "
    assert detok.get_next_output_text(delta=False) == "abc "
    detok.update(tokenizer.encode("OP"))
    assert detok.get_next_output_text(delta=True) == ""
    detok.update(tokenizer.encode("!"))  # "STOP!" can no longer become "STOP here"
    assert detok.get_next_output_text(delta=True) == "STOP!"
    detok.update(tokenizer.encode(" STOP h"))
    assert detok.get_next_output_text(delta=True) == " "
    # The request ends for another reason (length): the held text is released.
    assert detok.get_next_output_text(delta=True, finished=True) == "STOP h"
    assert detok.output_text == "abc STOP! STOP h"


def test_include_stop_str_streams_without_holding_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"], include_stop_str_in_output=True)
    detok.update(tokenizer.encode("go ST"))
    assert detok.get_next_output_text(delta=True) == "go ST"
    assert detok.update(tokenizer.encode("OP and more")) == "STOP"
    assert detok.get_next_output_text(delta=True) == "OP"


def test_min_tokens_ignores_early_stops(tokenizer):
    ids = tokenizer.encode("ab ab ab")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["ab"], min_tokens=len(tokenizer.encode("ab ab")))
    assert detok.update(ids) == "ab"
    assert detok.output_text == "ab ab "


def test_stop_matching_special_token_text(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("hi") + [eos] + tokenizer.encode("there")
    shown = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, stop=["<|eos|>"])
    assert shown.update(ids) == "<|eos|>" and shown.output_text == "hi"
    hidden = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["<|eos|>"])
    assert hidden.update(ids) is None and hidden.output_text == "hithere"


def test_decode_token(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.decode_token(tokenizer.eos_token_id) == "<|eos|>"
    split = [t for t in tokenizer.encode("🤖") if FFFD in tokenizer.decode([t])]
    assert split and FFFD in detok.decode_token(split[0])
    word = max(tokenizer.encode(" The quick"), key=lambda t: len(tokenizer.decode([t])))
    assert len(tokenizer.decode([word])) >= 3
    assert detok.decode_token(word) == tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(word)])


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, [], stop=["ok", ""])
    with pytest.raises(TypeError, match="fast tokenizer"):
        IncrementalDetokenizer(object(), [])
    detok = IncrementalDetokenizer(tokenizer, [], stop=["b"])
    assert detok.update(tokenizer.encode("abc")) == "b"
    with pytest.raises(RuntimeError, match="already finished"):
        detok.update([5])
