"""The prefix cache: KV of complete token blocks, kept after a request for later requests
whose prompts start with the same tokens (an editor or a chat client re-sends its whole
context every turn).

Blocks are ``block_tokens`` consecutive tokens of one sequence, starting at a multiple of
``block_tokens``. A block is keyed by a hash chain: the key of block i is
``blake2b(key of block i-1 + its token ids)``, and the chain of a sequence starts from the
hash of a model identity, so a key names a block's tokens AND everything before them AND the
model (and quantization) that computed them: the same tokens under another identity are
other blocks.

A block holds copies of the sequence's cache entries for its tokens (``KVCache.read_span``:
MLA's compressed latent [L, N, W], GQA's K and V [L, N, Hkv, Dh]) in host RAM. A new
sequence whose prompt starts with cached blocks gets them copied into its own (empty) cache
(``KVCache.write_span``) and prefills only the rest; at least one prompt token is always left
to prefill, since the first token is picked from that forward's logits. Copies, not shared
storage: a block can be evicted while a sequence that copied it runs.

Bounded by ``capacity_bytes``: least recently used blocks go first. A chain is touched from
its last block to its first, so an ancestor is always more recent than its descendants and
eviction takes the tails of chains first, never leaving a block whose parent is gone.

Only what a forward really wrote is stored: the caller passes the tokens in the cache
(``cache.length`` of them), and only complete blocks of those are kept, so a cancelled
request never leaves a half-written block.

Legend: L = layers, N = tokens of a block, W = MLA latent width, Hkv = key/value heads,
Dh = head dim.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from krasisd.engine.loop_options import DEFAULT_BLOCK_TOKENS

__all__ = ["DEFAULT_BLOCK_TOKENS", "PrefixCache", "PrefixStats", "block_keys"]

_DIGEST_BYTES = 16


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


def block_keys(identity: str, tokens: Sequence[int], block_tokens: int) -> list[bytes]:
    """The hash-chain keys of the complete blocks of ``tokens`` under ``identity``."""
    key = _digest(b"krasis-prefix\0", identity.encode())
    keys = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        key = _digest(key, array("q", tokens[start:start + block_tokens]).tobytes())
        keys.append(key)
    return keys


@dataclass
class PrefixStats:
    """Prompt tokens read from the cache (hits) and prefilled (misses), what is held now."""

    hit_tokens: int = 0
    miss_tokens: int = 0
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "blocks": self.blocks, "capacity_bytes": self.capacity_bytes,
                "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens,
                "hit_rate": round(self.hit_rate, 4), "evicted_blocks": self.evicted_blocks}


@dataclass
class _Block:
    tensors: tuple[torch.Tensor, ...]  # each [L, N, ...] on the host
    nbytes: int


class PrefixCache:
    """Blocks of KV by hash-chain key, least recently used first, within ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.stats = PrefixStats(capacity_bytes=capacity_bytes)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest use first

    @property
    def capacity_bytes(self) -> int:
        return self.stats.capacity_bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def matched_blocks(self, identity: str, prompt: Sequence[int]) -> list[bytes]:
        """Keys of the cached blocks ``prompt`` starts with, leaving at least its last token
        out (it is prefilled for the first logits)."""
        keys = []
        for key in block_keys(identity, prompt[:len(prompt) - 1], self.block_tokens):
            if key not in self._blocks:
                break
            keys.append(key)
        return keys

    def restore(self, identity: str, prompt: Sequence[int], cache) -> int:
        """Copy the cached blocks ``prompt`` starts with into the empty ``cache``; returns
        the prompt tokens it now holds (a multiple of ``block_tokens``, 0 on a miss)."""
        if cache.length:
            raise ValueError("a prefix is restored into an empty cache only")
        if not getattr(cache, "supports_prefix_blocks", True):  # a hybrid model's states
            return 0
        keys = self.matched_blocks(identity, prompt)
        for key in keys:
            cache.write_span(self._blocks[key].tensors)
        self._touch(keys)
        reused = len(keys) * self.block_tokens
        self.stats.hit_tokens += reused
        return reused

    def count_prefilled(self, num_tokens: int) -> None:
        """``num_tokens`` prompt tokens were forwarded (misses)."""
        self.stats.miss_tokens += num_tokens

    def store(self, identity: str, tokens: Sequence[int], cache) -> int:
        """Keep the complete blocks of ``tokens``, the first ``cache.length`` of which are in
        ``cache``; returns the blocks added (the ones already held are only touched). A cache
        that cannot give spans of tokens (``supports_prefix_blocks`` False) stores nothing."""
        if not getattr(cache, "supports_prefix_blocks", True):
            return 0
        count = min(len(tokens), cache.length)
        keys = block_keys(identity, tokens[:count], self.block_tokens)
        added = chain_bytes = 0
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None:
                if i and chain_bytes + chain_bytes // i > self.capacity_bytes:
                    keys = keys[:i]  # blocks of one cache have one size: this one cannot fit
                    break
                start = i * self.block_tokens
                block = _Block(cache.read_span(start, start + self.block_tokens), 0)
                block.nbytes = sum(t.numel() * t.element_size() for t in block.tensors)
                if chain_bytes + block.nbytes > self.capacity_bytes:
                    keys = keys[:i]  # the rest of a chain longer than the whole cache: the
                    break            # head is what later prompts share, so it is kept
                self._blocks[key] = block
                self.stats.bytes += block.nbytes
                added += 1
            chain_bytes += block.nbytes
        self._touch(keys)
        self._evict()
        self.stats.blocks = len(self._blocks)
        return added

    def clear(self) -> None:
        self._blocks.clear()
        self.stats.bytes = self.stats.blocks = 0

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used, its first block last (the most recent)."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.stats.bytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.stats.bytes -= block.nbytes
            self.stats.evicted_blocks += 1
        self.stats.blocks = len(self._blocks)
