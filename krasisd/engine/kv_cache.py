"""KV caches, preallocated for ``max_tokens``: MLA's compressed latent, or GQA's K and V.

A forward pass writes each layer's new entries after the ``length`` tokens already cached
and reads everything up to them; the engine then calls ``advance(T)`` once all layers have
run, so a failed forward never leaves a half-written token counted as cached.

Legend: L = layers, M = max_tokens, S = cached + new tokens, T = new tokens, W = latent width,
Hkv = key/value heads, Dh = head_dim.
"""

from __future__ import annotations

import torch

from krasisd.engine.config import ModelConfig


class KVCache:
    """Common bookkeeping: capacity and the number of tokens already cached.

    ``compressed`` says the kind: True for MLA's latent cache (``entries``), False for GQA's
    keys and values; callers read it instead of looking for attributes."""

    compressed = False

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.length = 0

    def _span(self, num_new: int) -> tuple[int, int]:
        end = self.length + num_new
        if end > self.max_tokens:
            raise ValueError(
                f"context full: {self.length} cached + {num_new} new tokens > {self.max_tokens}"
            )
        return self.length, end

    def check_room(self, num_new: int) -> None:
        """Raise ValueError unless ``num_new`` more tokens fit."""
        self._span(num_new)

    def advance(self, num_new: int) -> None:
        """Count ``num_new`` written tokens as cached."""
        self.length = self._span(num_new)[1]

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def storage_key(self) -> int:
        """Tells caches apart by their storage: handles that share the tensors (copies made by
        ``copy.copy``) have the same key."""
        return self._tensors()[0].data_ptr()

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class MLAKVCache(KVCache):
    """Per token and layer: kv_lora_rank latent values + qk_rope_head_dim rotated key values."""

    compressed = True

    def __init__(self, num_layers: int, max_tokens: int, width: int, dtype, device):
        super().__init__(max_tokens)
        self.entries = torch.zeros(num_layers, max_tokens, width, dtype=dtype, device=device)

    def append(self, layer_idx: int, entries: torch.Tensor) -> torch.Tensor:
        """entries [T, W] -> all entries of the layer so far [S, W] (a view)."""
        start, end = self._span(entries.shape[0])
        self.entries[layer_idx, start:end] = entries
        return self.entries[layer_idx, :end]

    def _tensors(self):
        return [self.entries]


class GQAKVCache(KVCache):
    """Rotated keys and values of every key/value head."""

    def __init__(self, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        super().__init__(max_tokens)
        shape = (num_layers, max_tokens, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [T, Hkv, Dh] -> all keys and values of the layer so far, [S, Hkv, Dh] each."""
        start, end = self._span(k.shape[0])
        self.keys[layer_idx, start:end] = k
        self.values[layer_idx, start:end] = v
        return self.keys[layer_idx, :end], self.values[layer_idx, :end]

    def _tensors(self):
        return [self.keys, self.values]


def new_kv_cache(config: ModelConfig, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> KVCache:
    """The cache kind the model's attention needs."""
    if config.is_mla:
        return MLAKVCache(config.num_hidden_layers, max_tokens, config.kv_cache_width,
                          dtype, device)
    return GQAKVCache(config.num_hidden_layers, max_tokens, config.num_key_value_heads,
                      config.head_dim, dtype, device)
