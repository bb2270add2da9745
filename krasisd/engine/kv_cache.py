"""KV caches: MLA's compressed latent, or GQA's K and V, for up to ``max_tokens`` tokens.

A forward pass writes each layer's new entries after the ``length`` tokens already cached
and reads everything up to them; the engine then calls ``advance(T)`` once all layers have
run, so a failed forward never leaves a half-written token counted as cached.

Storage is either allocated for ``max_tokens`` up front (``grow=False``: the GPU's decode
graphs capture fixed buffer addresses) or grows with the sequence (``grow=True``, the CPU):
it starts at ``INITIAL_TOKENS`` and doubles, up to ``max_tokens``, when a write needs more
room, so a request with a huge ``num_ctx`` holds memory for the tokens it really has.

Legend: L = layers, M = allocated tokens (capacity), S = cached + new tokens, T = new tokens,
W = latent width, Hkv = key/value heads, Dh = head_dim.
"""

from __future__ import annotations

import torch

from krasisd.engine.config import ModelConfig

INITIAL_TOKENS = 256  # first allocation of a growing cache


class KVCache:
    """Common bookkeeping: the token limit, the allocated capacity and the tokens cached.

    ``compressed`` says the kind: True for MLA's latent cache (``entries``), False for GQA's
    keys and values; callers read it instead of looking for attributes."""

    compressed = False
    # spans of tokens can be read out and written back (the prefix cache); False for a cache
    # holding state that sums up the whole sequence (krasisd.engine.hybrid_cache)
    supports_prefix_blocks = True

    def __init__(self, max_tokens: int, grow: bool = False):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.grow = grow
        self.length = 0

    def _initial_capacity(self) -> int:
        return min(INITIAL_TOKENS, self.max_tokens) if self.grow else self.max_tokens

    @property
    def capacity(self) -> int:
        """Tokens the storage holds now (``max_tokens`` unless it grows)."""
        return self._tensors()[0].shape[1]

    def _check(self, num_new: int) -> tuple[int, int]:
        end = self.length + num_new
        if end > self.max_tokens:
            raise ValueError(
                f"context full: {self.length} cached + {num_new} new tokens > {self.max_tokens}"
            )
        return self.length, end

    def _span(self, num_new: int) -> tuple[int, int]:
        """Where ``num_new`` tokens go, growing the storage first if they need room."""
        start, end = self._check(num_new)
        if end > self.capacity:
            self._resize(min(self.max_tokens, max(end, 2 * self.capacity)))
        return start, end

    def check_room(self, num_new: int) -> None:
        """Raise ValueError unless ``num_new`` more tokens fit within ``max_tokens``."""
        self._check(num_new)

    def advance(self, num_new: int) -> None:
        """Count ``num_new`` written tokens as cached."""
        self.length = self._check(num_new)[1]

    def reset(self) -> None:
        self.length = 0

    def read_span(self, start: int, end: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, ...]:
        """Copies of cached tokens ``start:end`` on ``device``: MLA's entries [L, N, W], or
        GQA's keys and values [L, N, Hkv, Dh] each (N = end - start)."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"span {start}:{end} is outside the {self.length} cached tokens")
        return tuple(t[:, start:end].to(device, copy=True) for t in self._tensors())

    def write_span(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Append tokens whose entries were read by ``read_span`` (of a cache of the same
        model): written in place after the ``length`` cached tokens, into the same storage
        (growing it if it grows), then counted as cached."""
        num_new = tensors[0].shape[1]
        start, end = self._span(num_new)
        for stored, span in zip(self._tensors(), tensors, strict=True):
            stored[:, start:end].copy_(span)  # [L, N, ...], same dtype and device as stored
        self.advance(num_new)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def storage_key(self) -> int:
        """Tells caches apart by their storage: handles that share the tensors (copies made by
        ``copy.copy``) have the same key."""
        return self._tensors()[0].data_ptr()

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _resize(self, capacity: int) -> None:
        raise NotImplementedError


def _grown(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    """``tensor`` [L, M, ...] copied into new storage of ``capacity`` tokens along dim 1."""
    out = torch.zeros((tensor.shape[0], capacity, *tensor.shape[2:]), dtype=tensor.dtype,
                      device=tensor.device)
    out[:, : tensor.shape[1]] = tensor
    return out


class MLAKVCache(KVCache):
    """Per token and layer: kv_lora_rank latent values + qk_rope_head_dim rotated key values."""

    compressed = True

    def __init__(self, num_layers: int, max_tokens: int, width: int, dtype, device,
                 grow: bool = False):
        super().__init__(max_tokens, grow)
        self.entries = torch.zeros(num_layers, self._initial_capacity(), width, dtype=dtype,
                                   device=device)  # [L, M, W]

    def append(self, layer_idx: int, entries: torch.Tensor) -> torch.Tensor:
        """entries [T, W] -> all entries of the layer so far [S, W] (a view)."""
        start, end = self._span(entries.shape[0])
        self.entries[layer_idx, start:end] = entries
        return self.entries[layer_idx, :end]

    def _tensors(self):
        return [self.entries]

    def _resize(self, capacity: int) -> None:
        self.entries = _grown(self.entries, capacity)


class GQAKVCache(KVCache):
    """Rotated keys and values of every key/value head."""

    def __init__(self, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int,
                 dtype, device, grow: bool = False):
        super().__init__(max_tokens, grow)
        shape = (num_layers, self._initial_capacity(), num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, M, Hkv, Dh]
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [T, Hkv, Dh] -> all keys and values of the layer so far, [S, Hkv, Dh] each."""
        start, end = self._span(k.shape[0])
        self.keys[layer_idx, start:end] = k
        self.values[layer_idx, start:end] = v
        return self.keys[layer_idx, :end], self.values[layer_idx, :end]

    def _tensors(self):
        return [self.keys, self.values]

    def _resize(self, capacity: int) -> None:
        self.keys = _grown(self.keys, capacity)
        self.values = _grown(self.values, capacity)


def new_kv_cache(config: ModelConfig, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", grow: bool = False) -> KVCache:
    """The cache kind the model's attention needs; ``grow``: storage grows with the sequence
    instead of being allocated for ``max_tokens`` at once."""
    if config.is_hybrid:
        from krasisd.engine.hybrid_cache import HybridCache

        return HybridCache(config, max_tokens, dtype, device, grow)
    if config.is_mla:
        return MLAKVCache(config.num_hidden_layers, max_tokens, config.kv_cache_width,
                          dtype, device, grow)
    return GQAKVCache(config.num_hidden_layers, max_tokens, config.num_key_value_heads,
                      config.head_dim, dtype, device, grow)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV cache bytes one token of context takes, over all layers with attention KV (a hybrid
    model's DeltaNet layers keep a state of fixed size instead)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return len(config.full_attention_layers) * config.kv_cache_width * element_bytes


def state_bytes_per_sequence(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes a sequence's cache holds whatever its length: for each Gated DeltaNet layer of a
    hybrid model (krasisd.engine.hybrid_cache) a conv state [K-1, C] in ``dtype`` and a
    recurrent state [Hv, Dk, Dv] in float32; 0 for models without such layers."""
    linear_layers = config.num_hidden_layers - len(config.full_attention_layers)
    if linear_layers == 0:
        return 0
    element_bytes = torch.empty((), dtype=dtype).element_size()
    conv_channels = (2 * config.linear_num_key_heads * config.linear_key_head_dim
                     + config.linear_num_value_heads * config.linear_value_head_dim)
    conv_bytes = (config.linear_conv_kernel_dim - 1) * conv_channels * element_bytes
    recurrent_bytes = (config.linear_num_value_heads * config.linear_key_head_dim
                       * config.linear_value_head_dim * 4)
    return linear_layers * (conv_bytes + recurrent_bytes)
