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
        logits = logits.detach().to("cpu", torch.float32).clone()  # [V]
        if torch.isnan(logits).any():
            raise ValueError("logits contain NaN")
        self.apply_penalties(logits, history)
        if self.options.temperature == 0:
            token_id = int(torch.argmax(logits))
            return token_id, float(torch.log_softmax(logits, dim=-1)[token_id])
        values, ids = self._candidates(logits)  # [K], [K], sorted by value, descending
        keep = self._keep_mask(values)  # [K]
        log_probs = torch.log_softmax(values[keep] / self.options.temperature, dim=-1)  # [K']
        pick = int(torch.multinomial(log_probs.exp(), 1, generator=self.generator))
        return int(ids[keep][pick]), float(log_probs[pick])

    def apply_penalties(self, logits: torch.Tensor, history: list[int]) -> None:
        """Repeat, presence and frequency penalties, in place, over the last repeat_last_n."""
        opts = self.options
        if opts.repeat_penalty == 1.0 and opts.presence_penalty == 0 and opts.frequency_penalty == 0:
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
        top_k = self.options.top_k
        if 0 < top_k < logits.numel():
            return torch.topk(logits, top_k)  # [K], [K], sorted descending
        return torch.sort(logits, descending=True)  # [V], [V]

    def _keep_mask(self, values: torch.Tensor) -> torch.Tensor:
        """top_p then min_p on the sorted candidates; the best one is always kept."""
        probs = torch.softmax(values, dim=-1)  # [K]
        keep = torch.ones_like(values, dtype=torch.bool)
        if self.options.top_p < 1.0:
            mass_before = torch.cumsum(probs, dim=-1) - probs  # [K]
            keep &= mass_before < self.options.top_p
        if self.options.min_p > 0.0:
            keep &= probs >= self.options.min_p * probs[0]
        keep[0] = True
        return keep


def _penalty_window(history: list[int], repeat_last_n: int) -> list[int]:
    if repeat_last_n == 0:
        return []
    if repeat_last_n < 0:
        return list(history)
    return list(history[-repeat_last_n:])
