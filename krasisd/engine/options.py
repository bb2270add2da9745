"""What a generation request asks for, and what a streaming generation yields.

These are the engine's contract with the daemon: field names follow Ollama's options
(``num_predict``, ``repeat_penalty``, ...) so the API layer maps them one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_NUM_CTX = 4096  # the context window of a request that sets none (at most the model's)


@dataclass
class SamplingOptions:
    """Sampling settings; ``temperature == 0`` means greedy."""

    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.9  # 1.0 disables
    min_p: float = 0.0  # 0.0 disables
    repeat_penalty: float = 1.1  # 1.0 disables
    repeat_last_n: int = 64  # tokens looked back for the penalties; -1 = whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same text
    num_predict: int = -1  # max new tokens; -1 = until EOS or context end
    stop: list[str] = field(default_factory=list)
    # context window in tokens (prompt + generated); None: DEFAULT_NUM_CTX, or less where the
    # model's maximum or the runner's KV budget is less (krasisd.engine.loop)
    num_ctx: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.num_ctx is not None and self.num_ctx < 1:
            raise ValueError(f"num_ctx must be >= 1, got {self.num_ctx}")
        if self.num_predict < -1:
            raise ValueError(f"num_predict must be >= -1, got {self.num_predict}")


@dataclass
class GenerationChunk:
    """One streamed step: a token and the text it completed (may be empty), or the end.

    On the final chunk ``done`` is True, ``done_reason`` is "stop" (EOS or a stop string)
    or "length" (num_predict or context end), and the Ollama counters are set (ns).
    """

    token_id: int | None
    text: str
    done: bool = False
    done_reason: str | None = None
    logprob: float | None = None
    prompt_eval_count: int = 0
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
