"""Incremental detokenization for streaming.

Decoding one token at a time is wrong for most tokenizers: a character can span several byte
tokens (ByteLevel BPE, byte fallback), and Metaspace/SentencePiece decoders treat a leading
"▁" differently at the start of a sequence. The standard fix (TGI, vLLM) decodes a short
window twice: ``decode(ids[prefix:read])`` is text already emitted, ``decode(ids[prefix:])``
is that plus the new text. New text is emitted only when it does not end in U+FFFD, the
replacement character that a half-finished UTF-8 sequence decodes to, and the window then
slides forward, so each step costs a few tokens' decode, not the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from krasisd.engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Tokens held back at most: a character needs at most 4 byte tokens, so a longer run that still
# decodes to nothing new (ids without text) or to U+FFFD (invalid bytes) is let through, which
# keeps every push's decode short.
MAX_HELD_TOKENS = 8


def context_ids(tokenizer: Tokenizer, prompt_ids: Sequence[int], count: int = 4) -> list[int]:
    """The prompt's last ``count`` or so tokens, widened (up to 8 more) so that they start on a
    character boundary: good ``prefix_ids`` for a StreamDecoder."""
    start = max(len(prompt_ids) - count, 0)
    lowest = max(start - 8, 0)
    while start > lowest and tokenizer.decode(prompt_ids[start:]).startswith(REPLACEMENT_CHAR):
        start -= 1
    return list(prompt_ids[start:])


class StreamDecoder:
    """Turns a stream of token ids into text pieces that never split a character.

    ``prefix_ids`` (e.g. ``context_ids(prompt)``) give context and are never emitted, so a first
    generated token such as "▁Hello" streams as " Hello" rather than "Hello"; prefix ids whose
    text ends in an unfinished character are ignored. Without them, the concatenation of all
    pushes plus ``flush()`` equals ``decode(all ids)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prefix_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prefix_ids)
        if self._ids and self._decode(self._ids).endswith(REPLACEMENT_CHAR):
            self._ids = []  # context ending mid-character would swallow that character's end
        self._prefix_offset = 0  # window start: decoded for context only
        self._read_offset = len(self._ids)  # ids before this have been emitted (or are context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completed ("" while a character is unfinished)."""
        self._ids.append(token_id)
        emitted_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset:])
        incomplete = len(window_text) <= len(emitted_text) or window_text.endswith(REPLACEMENT_CHAR)
        if incomplete and len(self._ids) - self._read_offset < MAX_HELD_TOKENS:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(emitted_text):]

    def flush(self) -> str:
        """Return the held-back text (an unfinished character decodes to U+FFFD) and reset."""
        emitted_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window_text[len(emitted_text):]
