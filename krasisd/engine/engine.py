"""The engine's public face: ``load()`` a model folder, then run forwards, greedy or streamed
generation through a KV cache. See docs/engine.md for the API.

Legend: T = tokens in a forward, V = vocab.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from krasisd.config import DEVICES, QUANTS  # the one list of each (KRASIS_QUANT, KRASIS_DEVICE)
from krasisd.engine.batch import batched_decode
from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import KrasisEngineError, ModelLoadError
from krasisd.engine.experts import TorchExperts
from krasisd.engine.kv_cache import (
    KVCache,
    kv_bytes_per_token,
    new_kv_cache,
    state_bytes_per_sequence,
)
from krasisd.engine.loader import load_model, read_config
from krasisd.engine.models.common import CausalLM
from krasisd.engine.quant import BITS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# share of the GPU memory free after the load that KV caches may take by default; the rest
# is left for the decode graphs and prefill activations
KV_GPU_FREE_FRACTION = 0.8


class Engine:
    """A loaded model with its expert backend, tokenizer and end-of-sequence ids."""

    # KV caches on the CPU grow with the sequence; an engine whose decode steps bind to the
    # cache's storage (HybridEngine's graphs) turns this off
    grow_kv_caches = True

    def __init__(self, config: ModelConfig, model: CausalLM, expert_backend,
                 tokenizer=None, eos_token_ids: set[int] | None = None,
                 model_dir: Path | None = None):
        self.config = config
        self.model = model
        self.expert_backend = expert_backend
        model.expert_backend = expert_backend
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids or ())
        self.model_dir = model_dir
        self.closed = False

    @property
    def device(self) -> torch.device:
        return self.live_model().model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.live_model().model.embed_tokens.weight.dtype

    def live_model(self) -> CausalLM:
        """The model; raises KrasisEngineError once the engine is closed."""
        if self.closed:
            raise KrasisEngineError("the engine is closed")
        return self.model


    def new_cache(self, max_tokens: int) -> KVCache:
        """An empty KV cache with room for ``max_tokens`` tokens; on the CPU its storage grows
        with the sequence (krasisd.engine.kv_cache)."""
        device = self.device
        return new_kv_cache(self.config, max_tokens, self.dtype, device,
                            grow=self.grow_kv_caches and device.type == "cpu")

    def context_spec(self):
        """The model's maximum context and the KV bytes per token (krasisd.engine.loop)."""
        from krasisd.engine.loop import ContextSpec

        return ContextSpec(max_tokens=self.config.max_position_embeddings,
                           kv_bytes_per_token=kv_bytes_per_token(self.config, self.dtype),
                           state_bytes_per_sequence=state_bytes_per_sequence(self.config,
                                                                             self.dtype))

    def loop_options(self, **settings):
        """LoopOptions for this engine: the device's prefill chunk unless ``settings`` say."""
        from krasisd.engine.loop import LoopOptions, default_prefill_chunk_tokens

        if settings.get("prefill_chunk_tokens") is None:
            settings["prefill_chunk_tokens"] = default_prefill_chunk_tokens(self.device.type)
        return LoopOptions(**settings)

    def default_kv_budget_bytes(self) -> int | None:
        """KV memory a runner lets its sequences take unless told: half the available RAM on
        the CPU, KV_GPU_FREE_FRACTION of the free GPU memory on CUDA (None: unknown)."""
        device = self.device
        if device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            return int(free_bytes * KV_GPU_FREE_FRACTION)
        from krasisd.engine.loop_options import available_memory_bytes

        available = available_memory_bytes()
        return None if available is None else available // 2

    def plan_sequences(self, max_sequences: int) -> None:
        """Up to ``max_sequences`` sequences will decode at once (an engine that keeps
        resources per sequence sizes them here; this one keeps none)."""

    def _ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)  # [T]
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids.to(self.device)

    @torch.inference_mode()
    def forward(self, input_ids, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [T] -> float32 logits [T, V]; appends the tokens to ``cache`` when given.

        One token with a cache takes the decode path (absorbed MLA); more take prefill.
        ``last_only`` returns [1, V], the logits of the last token only: a long prompt then
        never materialises T x V logits.
        """
        model = self.live_model()
        ids = self._ids(input_ids)
        if cache is None:
            return model.prefill(ids, None, last_only=last_only)
        cache.check_room(ids.shape[0])
        if ids.shape[0] == 1:
            logits = model.decode(ids, cache)
        else:
            logits = model.prefill(ids, cache, last_only=last_only)
        cache.advance(ids.shape[0])
        return logits

    def decode_batch(self, token_ids: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of B sequences, each appending its token to its own cache:
        float32 logits [B, V] (krasisd.engine.batch.batched_decode: the weights are read
        once for all B)."""
        self._ids(token_ids)  # the same checks as forward's
        return batched_decode(self.live_model(), list(token_ids), caches)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 [T, V]: one full forward over ``ids``, no cache."""
        return self.forward(ids, None).cpu()

    def greedy(self, ids: list[int], max_new_tokens: int = 16) -> list[int]:
        """Up to ``max_new_tokens`` argmax tokens through the KV cache; an EOS token ends
        the list (and is included in it)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return []
        cache = self.new_cache(len(ids) + max_new_tokens)
        logits = self.forward(ids, cache, last_only=True)[-1]  # [V]
        new_tokens: list[int] = []
        while True:
            token = int(torch.argmax(logits))
            new_tokens.append(token)
            if token in self.eos_token_ids or len(new_tokens) == max_new_tokens:
                return new_tokens
            logits = self.forward([token], cache)[-1]

    def generate(self, prompt_ids: list[int], options,
                 should_cancel: Callable[[], bool] | None = None, pick=None) -> Iterator[Any]:
        """Stream GenerationChunks through the generation loop with this one sequence
        (krasisd.engine.generate.generate_stream; ``pick`` chooses each token instead of the
        sampler, as JSON mode does). A num_ctx beyond the model's maximum raises
        ContextLimitError, a ValueError."""
        self.live_model()
        generate_stream = _optional("krasisd.engine.generate", "generate_stream")
        return generate_stream(self, prompt_ids, options, should_cancel=should_cancel, pick=pick)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    **template_vars) -> str:
        """Render ``messages`` with the model's chat template (krasisd.engine.chat)."""
        if self.tokenizer is None:
            raise KrasisEngineError("this model folder has no tokenizer, so no chat template")
        render_chat = _optional("krasisd.engine.chat", "render_chat")
        return render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           **template_vars)

    def close(self) -> None:
        """Release the weights and the backend; later calls raise KrasisEngineError."""
        if self.closed:
            return
        self.expert_backend.close()
        self.closed = True
        self.model = None
        self.expert_backend = None


def _optional(module_name: str, attr: str):
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise KrasisEngineError(f"{module_name}.{attr} is not available: {exc}") from exc


def load(model_dir: str | Path, quant: str = "none", device: str = "cpu",
         threads: int | None = None, cache_dir: str | Path | None = None,
         dtype: torch.dtype | str | None = None, dense_from_cache: bool = False) -> Engine:
    """Load a Hugging Face model folder; raises ModelLoadError (or ValueError for bad options).

    ``dense_from_cache`` (quantized models): the dense linears the CPU cache stores run from
    those copies in the GPU kernels' layout (krasisd.engine.gpu.dense_decode) on ``device``,
    and their float weights are never read; the hybrid GPU load asks for it. Otherwise a
    CPU-only load runs them with the native kernels, and a GPU load in float."""
    torch_dtype = _check_options(quant, device, threads, dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    target = _resolve_device(device)
    backend = None
    if quant != "none":  # the CPU cache first: it says which dense weights need no reading
        backend = _native_backend(model_dir, read_config(model_dir), quant, cache_dir, threads)
    stored = dict(backend.dense) if dense_from_cache and backend is not None else {}
    loaded = load_model(model_dir, torch_dtype, with_experts=quant == "none", device=target,
                        skip_linears=stored)
    model = loaded.model
    if stored:
        _optional("krasisd.engine.gpu.dense_decode", "quantized_linears")(model, stored, target)
    if target.type != "cpu":
        model = model.to(target)
    if quant == "none":
        backend = TorchExperts({layer: tuple([t.to(target) for t in ts] for ts in lists)
                                for layer, lists in loaded.expert_weights.items()})
    elif target.type == "cpu" and not stored:  # CPU-only: dense quantized too (docs/architecture.md)
        _quantize_dense(model, quant, backend)
    tokenizer = _load_tokenizer(model_dir)
    eos = set(loaded.config.eos_token_ids) | _generation_eos(model_dir)
    if tokenizer is not None:
        eos |= set(tokenizer.eos_token_ids)
    log.info("engine ready: %s, quant=%s, device=%s", loaded.config.architecture, quant, target)
    return Engine(loaded.config, model, backend, tokenizer, eos, model_dir)


def _check_options(quant, device, threads, dtype) -> torch.dtype | None:
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was asked for, but no CUDA GPU is available")
    return torch.device(device)


def _native_backend(model_dir: Path, config: ModelConfig, quant: str, cache_dir, threads):
    from krasisd.engine.native_experts import create_backend

    try:
        return create_backend(model_dir=model_dir, config=config, quant=quant,
                              cache_dir=cache_dir, threads=threads)
    except (ValueError, KrasisEngineError):
        raise
    except Exception as exc:  # e.g. the expert cache cannot be built or read
        raise ModelLoadError(f"cannot set up {quant} CPU experts for {model_dir}: {exc}") from exc


def _quantize_dense(model: CausalLM, quant: str, backend) -> None:
    """Dense linears -> native INT4/INT8 on the expert backend's thread pool (dense_quant),
    read from the CPU cache where it holds them."""
    dense_quant = importlib.import_module("krasisd.engine.dense_quant")
    bits = BITS[quant]
    dense_quant.quantize_dense_linears(model, bits, runner=backend.runner,
                                       stored=backend.dense)  # from the cache


def _load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file():
        return None
    try:
        tokenizer_cls = importlib.import_module("krasisd.engine.tokenizer").Tokenizer
    except (ImportError, AttributeError):
        log.warning("krasisd.engine.tokenizer is not available; loading without a tokenizer")
        return None
    try:
        return tokenizer_cls.from_dir(model_dir)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc


def _generation_eos(model_dir: Path) -> set[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if eos is None:
        return set()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise ModelLoadError(f"{path}: eos_token_id must be an int or a list of ints")
    return set(ids)
