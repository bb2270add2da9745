"""The cache of the hybrid models (Qwen3-Next, Qwen3.5/3.6 MoE: krasisd.engine.models.qwen3_next):
keys and values for the full-attention layers, and for each Gated DeltaNet layer its recurrent
state and its conv state.

The KV part behaves as GQAKVCache (grows on the CPU, ``length``, ``check_room``, ``advance``).
The states are per sequence, not per token: a DeltaNet layer reads its state with
``linear_state`` and hands the new one to ``set_linear_state``; the new states are kept aside
and become the cache's only at ``advance``, once every layer has run, so a forward that fails
leaves the cache as it was (as the KV part, whose written tokens count only after ``advance``).

A state sums up every token before it and cannot be rebuilt from a span of tokens, so these
caches take no part in the prefix cache (``supports_prefix_blocks`` is False; krasisd.engine.
prefix_cache skips them).

Legend: L = full-attention layers, M = allocated tokens, Hkv = key/value heads, Dh = head_dim,
Hv = DeltaNet value heads, Dk / Dv = its key / value head sizes, K = conv kernel,
C = conv channels.
"""

from __future__ import annotations

import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.kv_cache import KVCache, _grown

NO_SPANS = ("a hybrid model's cache holds recurrent states, which spans of tokens cannot "
            "restore (supports_prefix_blocks is False)")


class HybridCache(KVCache):
    """Full-attention KV [L, M, Hkv, Dh] plus, per DeltaNet layer, a conv state [K-1, C] (the
    model's dtype) and a recurrent state [Hv, Dk, Dv] (float32)."""

    supports_prefix_blocks = False

    def __init__(self, config: ModelConfig, max_tokens: int, dtype, device, grow: bool = False):
        super().__init__(max_tokens, grow)
        full = config.full_attention_layers
        linear = [i for i in range(config.num_hidden_layers) if i not in full]
        self.kv_slot = {layer: slot for slot, layer in enumerate(full)}
        self.state_slot = {layer: slot for slot, layer in enumerate(linear)}
        shape = (len(full), self._initial_capacity(), config.num_key_value_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, M, Hkv, Dh]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        conv_channels = (2 * config.linear_num_key_heads * config.linear_key_head_dim
                         + config.linear_num_value_heads * config.linear_value_head_dim)
        self._conv_shape = (config.linear_conv_kernel_dim - 1, conv_channels)
        self._state_shape = (config.linear_num_value_heads, config.linear_key_head_dim,
                             config.linear_value_head_dim)
        self._dtype, self._device = dtype, device
        self.conv_states: list[torch.Tensor] = []  # per DeltaNet layer: [K-1, C]
        self.recurrent_states: list[torch.Tensor] = []  # per DeltaNet layer: [Hv, Dk, Dv]
        self._zero_states()
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> new states

    def _zero_states(self) -> None:
        count = len(self.state_slot)
        self.conv_states = [torch.zeros(self._conv_shape, dtype=self._dtype, device=self._device)
                            for _ in range(count)]
        self.recurrent_states = [torch.zeros(self._state_shape, dtype=torch.float32,
                                             device=self._device) for _ in range(count)]

    # ---- full attention -------------------------------------------------------------

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [T, Hkv, Dh] -> all keys and values of the layer so far, [S, Hkv, Dh] each."""
        slot = self.kv_slot[layer_idx]
        start, end = self._span(k.shape[0])
        self.keys[slot, start:end] = k
        self.values[slot, start:end] = v
        return self.keys[slot, :end], self.values[slot, :end]

    # ---- Gated DeltaNet -------------------------------------------------------------

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv state [K-1, C], recurrent state [Hv, Dk, Dv]) after the ``length`` tokens."""
        slot = self.state_slot[layer_idx]
        return self.conv_states[slot], self.recurrent_states[slot]

    def set_linear_state(self, layer_idx: int, conv_state: torch.Tensor,
                         recurrent_state: torch.Tensor) -> None:
        """The layer's states after this forward's tokens; they replace the current ones at
        ``advance``."""
        self._pending[self.state_slot[layer_idx]] = (conv_state, recurrent_state)

    def advance(self, num_new: int) -> None:
        """Count ``num_new`` written tokens as cached and take the forward's new states."""
        super().advance(num_new)
        for slot, (conv_state, recurrent_state) in self._pending.items():
            self.conv_states[slot] = conv_state.to(self._dtype)
            self.recurrent_states[slot] = recurrent_state.float()
        self._pending.clear()

    def reset(self) -> None:
        super().reset()
        self._pending.clear()
        self._zero_states()

    # ---- bookkeeping ----------------------------------------------------------------

    def read_span(self, start: int, end: int, device: torch.device | str = "cpu"):
        raise NotImplementedError(NO_SPANS)

    def write_span(self, tensors) -> None:
        raise NotImplementedError(NO_SPANS)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now: the KV storage and the states."""
        states = self.conv_states + self.recurrent_states
        return super().nbytes + sum(t.numel() * t.element_size() for t in states)

    def _tensors(self):
        return [self.keys, self.values]

    def _resize(self, capacity: int) -> None:
        self.keys = _grown(self.keys, capacity)
        self.values = _grown(self.values, capacity)

