"""The generation loop's settings and the context limits of a request, without torch (a
runner serving a plugged-in engine imports them too).

A request's ``num_ctx`` is checked against the model's maximum (``max_position_embeddings``)
and against the runner's KV budget (the bytes all running sequences' KV caches may take);
unset, it is DEFAULT_NUM_CTX capped by both.
"""

from __future__ import annotations

from dataclasses import dataclass

from krasisd.engine.options import DEFAULT_NUM_CTX, GenerationChunk

CPU_PREFILL_CHUNK_TOKENS = 512
# blocks of the prefix cache (krasisd.engine.prefix_cache), tokens each
DEFAULT_BLOCK_TOKENS = 16
# share of the host memory available at a runner's start the prefix cache takes by default
PREFIX_CACHE_RAM_FRACTION = 1 / 8
# on CUDA each chunk of a long prompt streams the CPU-held experts through the GPU once
# (krasisd.engine.gpu.prefill), so chunks are longer there
CUDA_PREFILL_CHUNK_TOKENS = 2048


def default_prefill_chunk_tokens(device_type: str) -> int:
    """Prompt tokens per prefill chunk on ``device_type`` ("cpu", "cuda", ...)."""
    return CUDA_PREFILL_CHUNK_TOKENS if device_type == "cuda" else CPU_PREFILL_CHUNK_TOKENS


class ContextLimitError(ValueError):
    """A num_ctx beyond the model's maximum or the KV budget (the runner answers 400)."""


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs: ``max_batch`` sequences at once (a runner's --num-parallel),
    prompts in chunks of ``prefill_chunk_tokens``, at most ``step_token_budget`` tokens per
    step (None: a full chunk next to ``max_batch`` decode tokens), the KV memory all
    admitted sequences may need together (None: no limit), and the host memory of the
    prefix cache (krasisd.engine.prefix_cache; 0: off), in blocks of
    ``prefix_block_tokens`` tokens."""

    max_batch: int = 1
    prefill_chunk_tokens: int = CPU_PREFILL_CHUNK_TOKENS
    step_token_budget: int | None = None
    kv_budget_bytes: int | None = None
    prefix_cache_bytes: int = 0
    prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        if self.step_token_budget is not None and self.step_token_budget <= self.max_batch:
            raise ValueError(f"step_token_budget ({self.step_token_budget}) must be more than "
                             f"max_batch ({self.max_batch}), or no prompt could ever be prefilled")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes must be >= 1, got {self.kv_budget_bytes}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.prefix_block_tokens < 1:
            raise ValueError(f"prefix_block_tokens must be >= 1, got {self.prefix_block_tokens}")

    @property
    def tokens_per_step(self) -> int:
        if self.step_token_budget is not None:
            return self.step_token_budget
        return self.prefill_chunk_tokens + self.max_batch


@dataclass(frozen=True)
class ContextSpec:
    """What a context costs on this model: its maximum (``max_position_embeddings``), the KV
    bytes of one token (0: not counted) and the bytes a sequence holds whatever its length
    (the recurrent and conv states of a hybrid model's DeltaNet layers; 0 for the others)."""

    max_tokens: int | None = None
    kv_bytes_per_token: int = 0
    state_bytes_per_sequence: int = 0

    def sequence_bytes(self, num_ctx: int) -> int:
        """Worst-case cache bytes of one sequence of ``num_ctx`` tokens."""
        return num_ctx * self.kv_bytes_per_token + self.state_bytes_per_sequence


def resolve_num_ctx(requested: int | None, context: ContextSpec,
                    kv_budget_bytes: int | None) -> int:
    """The context window of a request: ``requested`` if the model and the KV budget allow
    it (else ContextLimitError, naming the numbers), or by default DEFAULT_NUM_CTX capped by
    both."""
    max_tokens = context.max_tokens
    budget_tokens = None
    if kv_budget_bytes is not None and context.kv_bytes_per_token > 0:
        room_bytes = kv_budget_bytes - context.state_bytes_per_sequence
        budget_tokens = max(room_bytes // context.kv_bytes_per_token, 1)
    if requested is None:
        return min(t for t in (DEFAULT_NUM_CTX, max_tokens, budget_tokens) if t is not None)
    problems = []
    if max_tokens is not None and requested > max_tokens:
        problems.append(f"num_ctx {requested} is more than this model's maximum context of "
                        f"{max_tokens} tokens (max_position_embeddings)")
    if budget_tokens is not None and requested > budget_tokens:
        problems.append(
            f"num_ctx {requested} needs {_size(context.sequence_bytes(requested))} of KV "
            f"cache, more than this runner's KV budget of {_size(kv_budget_bytes)} "
            f"({budget_tokens} tokens)")
    if problems:
        raise ContextLimitError("; ".join(problems))
    return requested


@dataclass
class Emitted:
    """A chunk for a sequence, or the error that ended it (``chunk`` None)."""

    generation: object  # krasisd.engine.generate.Generation
    chunk: GenerationChunk | None = None
    error: BaseException | None = None


@dataclass
class LoopStats:
    """Steps run, decode tokens and prompt chunks forwarded, prompt tokens forwarded and
    read from the prefix cache, seconds inside forwards."""

    steps: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    prefill_tokens: int = 0
    prefix_hit_tokens: int = 0
    forward_s: float = 0.0



def available_memory_bytes() -> int | None:
    """The kernel's MemAvailable (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_prefix_cache_bytes() -> int:
    """The prefix cache's bound unless told: PREFIX_CACHE_RAM_FRACTION of the available host
    memory (a quarter of the CPU's default KV budget); 0 when that is unknown."""
    available = available_memory_bytes()
    return 0 if available is None else int(available * PREFIX_CACHE_RAM_FRACTION)


def _size(num_bytes: int | None) -> str:
    num = float(num_bytes or 0)
    for unit in ("bytes", "KiB", "MiB"):
        if num < 1024:
            return f"{num:.0f} bytes" if unit == "bytes" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} GiB"
