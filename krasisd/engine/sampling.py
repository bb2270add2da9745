"""Next-token sampling with Ollama's options, in llama.cpp's order.

The chain: penalties (repeat, presence, frequency) over the last ``repeat_last_n`` tokens,
then top_k, top_p, min_p (these three on the softmax at temperature 1, as llama.cpp does),
then temperature, then one draw from a seeded ``torch.Generator``.

- repeat_penalty (llama.cpp): a seen token's logit is divided by the penalty when positive
  and multiplied by it when negative, once per distinct token.
- presence/frequency (OpenAI): ``logit -= presence * (count > 0) + frequency * count``.
- temperature 0 is greedy: the argmax of the penalized logits.

The returned logprob is the chosen token's log-probability under the distribution it was
drawn from (after penalties, masks and temperature). For greedy decoding that distribution
would be a point mass, so the logprob is taken under the penalized logits at temperature 1.
"""

from __future__ import annotations

import math

import torch

from krasisd.engine.options import SamplingOptions

# V = vocabulary, K = candidates kept after top_k (K = V when top_k is off)


class Sampler:
    """Picks the next token from a logits vector; one Sampler per generation (it owns the RNG)."""

    def __init__(self, options: SamplingOptions):
        self.options = options
        self.generator = torch.Generator(device="cpu")
        if options.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(options.seed))

    def sample(self, logits: torch.Tensor, history: list[int]) -> tuple[int, float]:
        """Return (token_id, logprob) for ``logits`` [V] given the tokens seen so far."""
        if logits.dim() != 1:
            raise ValueError(f"logits must be one vector [V], got shape {tuple(logits.shape)}")
        logits = logits.detach().to("cpu", torch.float32)  # [V]
        if self._has_penalties():
            logits = logits.clone()  # the caller's tensor stays as it was
            self.apply_penalties(logits, history)
        if self.options.temperature == 0:
            token_id = int(torch.argmax(logits))
            logprob = float(torch.log_softmax(logits, dim=-1)[token_id])
        else:
            values, ids = self._candidates(logits)  # [K], [K]
            log_probs = torch.log_softmax(values / self.options.temperature, dim=-1)  # [K]
            pick = self._draw(log_probs.exp())
            token_id, logprob = int(ids[pick]), float(log_probs[pick])
        if math.isnan(logprob):
            raise ValueError("logits contain NaN")
        return token_id, logprob

    def _has_penalties(self) -> bool:
        opts = self.options
        return not (opts.repeat_penalty == 1.0 and opts.presence_penalty == 0
                    and opts.frequency_penalty == 0)

    def apply_penalties(self, logits: torch.Tensor, history: list[int]) -> None:
        """Repeat, presence and frequency penalties, in place, over the last repeat_last_n."""
        opts = self.options
        if not self._has_penalties():
            return
        window = _penalty_window(history, opts.repeat_last_n)
        if not window:
            return
        seen = torch.tensor(window, dtype=torch.long)
        if int(seen.min()) < 0 or int(seen.max()) >= logits.numel():
            raise ValueError(f"history holds token ids outside [0, {logits.numel()})")
        ids, counts = torch.unique(seen, return_counts=True)  # [U], [U]
        picked = logits[ids]  # [U]
        if opts.repeat_penalty != 1.0:
            picked = torch.where(
                picked > 0, picked / opts.repeat_penalty, picked * opts.repeat_penalty
            )
        picked = picked - opts.frequency_penalty * counts - opts.presence_penalty
        logits[ids] = picked

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens that survive top_k, top_p and min_p, without sorting all of V."""
        opts, vocab_size = self.options, logits.numel()
        if 0 < opts.top_k < vocab_size:
            values, ids = torch.topk(logits, opts.top_k)  # [K], [K], sorted descending
            probs = torch.softmax(values, dim=-1)  # [K]
            keep = _top_p_keep(probs, opts.top_p) & (probs >= opts.min_p * probs[0])
        elif opts.top_p < 1.0:
            values, ids = _top_p_prefix(logits, opts.top_p)  # [K], [K], sorted descending
            keep = values >= values[0] + math.log(opts.min_p) if opts.min_p > 0 else None
        elif opts.min_p > 0.0:
            ids = torch.nonzero(logits >= logits.max() + math.log(opts.min_p)).flatten()  # [K]
            return logits[ids], ids
        else:
            return logits, torch.arange(vocab_size)  # [V], [V]
        if keep is None:
            return values, ids
        keep[0] = True
        return values[keep], ids[keep]

    def _draw(self, probs: torch.Tensor) -> int:
        """One index drawn from ``probs`` [K] with the seeded generator (inverse CDF)."""
        cdf = torch.cumsum(probs, dim=-1)  # [K]
        u = torch.rand(1, generator=self.generator) * cdf[-1]
        return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def _top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask of the smallest prefix of ``probs`` (sorted, descending) whose mass reaches top_p."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    return torch.cumsum(probs, dim=-1) - probs < top_p


def _top_p_prefix(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top_p over all of V: grow a top-k window until it holds the nucleus (sorting 100K
    logits takes ~10 ms on one thread; the nucleus is usually a few hundred tokens)."""
    log_z = torch.logsumexp(logits, dim=-1)
    k = min(256, logits.numel())
    while True:
        values, ids = torch.topk(logits, k)  # [k], [k], sorted descending
        keep = _top_p_keep(torch.exp(values - log_z), top_p)  # [k]
        kept = int(keep.sum())
        if kept < k or k == logits.numel():
            return values[:max(kept, 1)], ids[:max(kept, 1)]
        k = min(k * 4, logits.numel())


def _penalty_window(history: list[int], repeat_last_n: int) -> list[int]:
    if repeat_last_n == 0:
        return []
    if repeat_last_n < 0:
        return list(history)
    return list(history[-repeat_last_n:])
