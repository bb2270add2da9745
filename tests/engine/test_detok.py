"""Streaming detokenization: pieces concatenate to the full decode and never split a char."""

import random

import pytest
from test_tokenizer import BACKENDS, CORPUS, UNSEEN, write_model_dir

from krasisd.engine.detokenize import (
    MAX_HELD_TOKENS,
    REPLACEMENT_CHAR,
    StreamDecoder,
    context_ids,
)
from krasisd.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def tokenizer(request, tmp_path_factory):
    path = write_model_dir(tmp_path_factory.mktemp(request.param), BACKENDS[request.param]())
    return Tokenizer.from_dir(path)


def stream(tokenizer, ids, prefix_ids=(), skip_special_tokens=False):
    decoder = StreamDecoder(tokenizer, prefix_ids=prefix_ids,
                            skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("text", CORPUS + UNSEEN + ["<|im_start|>x 中<|im_end|>é"])
def test_pieces_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    for skip in (False, True):
        pieces, rest = stream(tokenizer, ids, skip_special_tokens=skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) + rest == full
        if REPLACEMENT_CHAR not in full:
            assert not any(REPLACEMENT_CHAR in p for p in pieces + [rest])


def test_multibyte_characters_split_over_tokens_arrive_whole(tokenizer):
    text = "中🎉é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # the tokenizers are small, so at least one of these characters spans several tokens
    assert len(ids) > 3
    pieces, rest = stream(tokenizer, ids)
    assert rest == ""
    assert [p for p in pieces if p] == [c for c in text if c in "".join(pieces)]
    assert "".join(pieces) == text


def random_ids(tokenizer, rng, count):
    """A whole token (not a lone <0xNN> byte-fallback token), or the tokens of a random
    (often multi-byte) character."""
    chars = "aé中文🎉😀👩‍💻 \nΩ𝔘"
    whole = [i for i in range(tokenizer.vocab_size)
             if not tokenizer.id_to_token(i).startswith("<0x")]
    ids = []
    for _ in range(count):
        if rng.random() < 0.5:
            ids.append(rng.choice(whole))
        else:
            ids += tokenizer.encode(rng.choice(chars), add_special_tokens=False)
    return ids


def test_random_token_streams_match_the_full_decode(tokenizer):
    rng = random.Random(1234)
    checked = 0
    for _ in range(100):
        ids = random_ids(tokenizer, rng, rng.randint(1, 20))
        full = tokenizer.decode(ids)
        if REPLACEMENT_CHAR in full and tokenizer.backend.decoder.__class__.__name__ != "ByteLevel":
            continue  # byte fallback turns a whole invalid byte run into U+FFFD: grouping-dependent
        pieces, rest = stream(tokenizer, ids)
        assert "".join(pieces) + rest == full
        checked += 1
    assert checked >= 30


def test_prefix_ids_give_context_and_are_not_emitted(tokenizer):
    ids = tokenizer.encode("The quick brown fox, 中文 and 🎉 jumps", add_special_tokens=False)
    full = tokenizer.decode(ids)
    kept_space = 0
    for split in range(3, len(ids)):
        head = tokenizer.decode(ids[:split])
        if not full.startswith(head) or head.endswith(REPLACEMENT_CHAR):
            continue
        prefix = context_ids(tokenizer, ids[:split], count=3)
        assert not tokenizer.decode(prefix).startswith(REPLACEMENT_CHAR)
        pieces, rest = stream(tokenizer, ids[split:], prefix_ids=prefix)
        assert "".join(pieces) + rest == full[len(head):]
        kept_space += full[len(head):].startswith(" ")
    assert kept_space >= 1  # a first "▁word"/"Ġword" token streams with its space


def test_incomplete_character_is_held_then_flushed(tokenizer):
    ids = tokenizer.encode("ab中", add_special_tokens=False)
    head = tokenizer.encode("ab", add_special_tokens=False)
    if ids[:len(head)] != head or len(ids) - len(head) < 2:
        pytest.skip("this tokenizer has 中 as one token")
    pieces, rest = stream(tokenizer, ids[:-1])  # drop the character's last byte token
    assert "".join(pieces) == "ab"
    assert rest.startswith(REPLACEMENT_CHAR)


def test_prefix_ending_mid_character_is_not_used_as_context(tokenizer):
    ids = tokenizer.encode("ab中", add_special_tokens=False)
    head = tokenizer.encode("ab", add_special_tokens=False)
    if ids[:len(head)] != head or len(ids) - len(head) < 2:
        pytest.skip("this tokenizer has 中 as one token")
    pieces, rest = stream(tokenizer, ids[-1:], prefix_ids=ids[:-1])
    assert "".join(pieces) + rest == tokenizer.decode(ids[-1:])


def test_ids_past_the_vocabulary_stream_as_nothing(tokenizer):
    ids = tokenizer.encode("héllo", add_special_tokens=False)
    pieces, rest = stream(tokenizer, ids[:2] + [tokenizer.vocab_size + 3] + ids[2:])
    assert "".join(pieces) + rest == "héllo"


def test_held_back_tokens_are_bounded(tokenizer):
    # ids past the vocabulary decode to nothing; the window must not grow with them
    decoder = StreamDecoder(tokenizer)
    for _ in range(100):
        decoder.push(tokenizer.vocab_size + 1)
    assert len(decoder._ids) - decoder._prefix_offset <= 2 * MAX_HELD_TOKENS
    ids = tokenizer.encode("héllo 中", add_special_tokens=False)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)
