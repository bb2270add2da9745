"""A runner process: one loaded model, kept warm, serving generations for the daemon.

Started by the daemon as ``python -m krasisd.runner --fd N --model NAME ...`` (see
``krasisd.runners`` for the message protocol). A reader thread takes messages from the
daemon and only puts them in the :class:`Inbox`; ONE engine thread (the one that calls
:func:`serve`) owns the engine: between two steps of the generation loop
(krasisd.engine.loop) it takes the new requests and cancels, then runs a step and sends the
chunks it produced. Up to ``--num-parallel`` requests decode together in one batched forward
per step, a long prompt is prefilled in chunks between those steps, a cancel ends its
request at the next step, mid-prompt too, and the loop's prefix cache
(``--prefix-cache-bytes``) spares prefilling the context a request shares with earlier ones.
An engine that is not a krasis Engine (a plugged-in loader, a test fake) only streams: its
streams advance one chunk per step (krasisd.runner_streams). When the daemon goes away (the channel closes) the runner stops
stepping and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

# The runner is a fresh interpreter and nothing above loads torch: set OpenMP's wait policy before
# it does, or torch's spinning OpenMP workers starve the native kernels' thread pool (CPU decode
# measured 3-8x slower on 2 cores). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from krasisd.config import (  # noqa: E402
    DEFAULT_GPU_DENSE,
    DEFAULT_GPU_PREFILL_MIN_TOKENS,
    DEFAULT_RUNNER_LOADER,
    gpu_dense_value,
    num_parallel_value,
)
from krasisd.engine.engine_options import EngineOptions  # noqa: E402
from krasisd.engine.loop_options import LoopOptions, default_prefix_cache_bytes  # noqa: E402
from krasisd.engine.options import GenerationChunk, SamplingOptions  # noqa: E402
from krasisd.runner_streams import Stream, StreamLoop  # noqa: E402
from krasisd.tools import THINK_FORMAT, ToolCallStream, tool_format  # noqa: E402

log = logging.getLogger("krasisd.runner")


class PromptError(Exception):
    """A request this model cannot serve (HTTP 400), e.g. a suffix without FIM support."""


class Channel:
    """JSON lines over the socket shared with the daemon; send() is thread-safe."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()
        self._file = sock.makefile("rb")

    def send(self, message: dict) -> None:
        data = json.dumps(message, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            self._sock.sendall(data)

    def __iter__(self) -> Iterator[dict]:
        for line in self._file:
            yield json.loads(line)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The engine's settings from the runner's command line, checked once."""
    return EngineOptions(
        quant=args.quant, device=args.device, threads=args.threads, cache_dir=args.cache_dir,
        gpu_cache_dir=args.gpu_cache_dir, gpu_dense=args.gpu_dense,
        vram_budget_bytes=args.vram_budget, gpu_prefill_min_tokens=args.gpu_prefill_min_tokens,
        autotune=args.moe_autotune == "on", tuning_dir=args.tuning_dir)


def load_engine(args: argparse.Namespace):
    """Import the loader ('module:function') and load the model with the daemon's settings.

    The built-in loader (krasisd.engine.serving:load_for_serving) gets every setting as one
    EngineOptions. A plugged-in loader gets keywords: model_dir, quant, device, threads,
    cache_dir, and ``gpu_cache_dir`` and ``gpu_dense`` only when given and not the default,
    so one without those arguments keeps working with the default settings."""
    module_name, func_name = args.loader.split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
    if args.loader == DEFAULT_RUNNER_LOADER:
        return loader(args.model_dir, options=engine_options(args))
    extra = {"gpu_cache_dir": args.gpu_cache_dir} if args.gpu_cache_dir else {}
    if args.gpu_dense != DEFAULT_GPU_DENSE:
        extra["gpu_dense"] = args.gpu_dense
    return loader(args.model_dir, quant=args.quant, device=args.device,
                  threads=args.threads, cache_dir=args.cache_dir, **extra)


def render_prompt(engine, request: dict, model: str) -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add special tokens (raw prompts)."""
    suffix = request.get("suffix")
    template = getattr(engine.tokenizer, "chat_template", None) or ""
    if suffix and "suffix" not in template:
        raise PromptError(f"model {model!r} does not support 'suffix' (fill-in-the-middle): "
                          "its template has no suffix slot")
    if request.get("raw") and not suffix:
        return request.get("prompt") or "", True
    messages = request.get("messages")
    if messages is None:
        messages = [{"role": "system", "content": request["system"]}] if request.get("system") \
            else []
        messages.append({"role": "user", "content": request.get("prompt") or ""})
    extra = {"suffix": suffix} if suffix else {}
    if request.get("tools"):
        extra["tools"] = request["tools"]
    think = request.get("think")
    if think is not None:  # Qwen3's templates read enable_thinking, gpt-oss's reasoning_effort
        extra["enable_thinking"] = bool(think)
        if isinstance(think, str):
            extra["reasoning_effort"] = think
    return engine.chat_prompt(messages, add_generation_prompt=True, **extra), False


def prompt_ids(engine, text: str, add_special: bool, num_ctx: int) -> list[int]:
    """Tokenize; a prompt that does not fit num_ctx keeps its last num_ctx - 1 tokens."""
    ids = engine.tokenizer.encode(text, add_special_tokens=add_special)
    if len(ids) >= num_ctx:
        log.warning("prompt truncated to fit num_ctx",
                    extra={"prompt_tokens": len(ids), "num_ctx": num_ctx})
        ids = ids[len(ids) - (num_ctx - 1):]
    return ids


def _prepared(engine, loop, request: dict, prompt: tuple[str, bool]
              ) -> tuple[SamplingOptions, list[int]]:
    """The request's options, its num_ctx resolved (checked against the model and the KV
    budget: ContextLimitError), and the ids of its rendered ``prompt`` (render_prompt's)."""
    options = SamplingOptions(**request["options"])
    text, add_special = prompt
    options = dataclasses.replace(options, num_ctx=loop.num_ctx(options.num_ctx))
    return options, prompt_ids(engine, text, add_special, options.num_ctx)


def _generation(engine, loop, request: dict, model: str, prompt: tuple[str, bool],
                should_cancel: Callable[[], bool]):
    """A krasis Engine's request: a Generation for the loop (JSON mode: its ``pick``)."""
    from krasisd.engine.generate import Generation

    options, ids = _prepared(engine, loop, request, prompt)
    pick = None
    if request.get("format") == "json":
        from krasisd.jsonmode import json_mode

        options, pick = json_mode(engine, options)
    elif isinstance(request.get("format"), dict):  # a JSON schema (krasisd.grammars)
        from krasisd.engine.constrained import grammar_mode
        from krasisd.grammars import json_schema_grammar

        options, pick = grammar_mode(engine, options, json_schema_grammar(request["format"]))
    return Generation(engine, ids, options, should_cancel, pick, key=request["id"])


def _stream(engine, loop, request: dict, model: str, prompt: tuple[str, bool],
            should_cancel: Callable[[], bool]):
    """A streaming-only engine's request: its ``generate`` iterator."""
    if request.get("format"):
        raise PromptError(f"model {model!r} does not support 'format': its engine "
                          "only streams text")
    options, ids = _prepared(engine, loop, request, prompt)
    return Stream(engine.generate(ids, options, should_cancel=should_cancel), key=request["id"])


def _loop_for(engine, options: LoopOptions):
    """The loop that serves ``engine`` and how a request becomes one of its sequences: the
    generation loop for a krasis Engine, the stream loop for any other engine (checked
    without importing torch for one that is not)."""
    if _is_krasis_engine(engine):
        from krasisd.engine.loop import GenerationLoop

        engine.plan_sequences(options.max_batch)
        return GenerationLoop(engine, options, engine.context_spec()), _generation
    return StreamLoop(options), _stream


def _is_krasis_engine(engine) -> bool:
    engine_module = sys.modules.get("krasisd.engine.engine")
    return engine_module is not None and isinstance(engine, engine_module.Engine)


def tool_parser(engine, request: dict, prompt_text: str = "") -> ToolCallStream | None:
    """The splitter of an answer: with tools, the model's tool-call format read from its chat
    templates or architecture (krasisd.tools); with ``think`` asked for, that format when it
    has reasoning spans, else ``<think>...</think>`` (started already when ``prompt_text``
    ends with ``<think>``); None otherwise, or without tools and a known format."""
    tools, think = request.get("tools"), request.get("think")
    if not tools and not think:
        return None
    tokenizer = getattr(engine, "tokenizer", None)
    templates = getattr(tokenizer, "chat_templates", None) or {
        "default": getattr(tokenizer, "chat_template", None) or ""}
    architecture = getattr(getattr(engine, "config", None), "architecture", None)
    fmt = tool_format(chat_template="\n".join(templates.values()), architecture=architecture)
    if not think:
        return ToolCallStream(fmt, tools) if fmt else None
    if fmt is None or not tools:
        fmt = fmt if fmt is not None and fmt.reasoning else THINK_FORMAT
    elif not fmt.reasoning:  # calls in the model's format, thinking between <think> tags
        fmt = dataclasses.replace(fmt, reasoning=THINK_FORMAT.reasoning)
    opened = prompt_text.rstrip().endswith(fmt.reasoning[0].start)
    return ToolCallStream(fmt, tools, in_reasoning=opened)


def _with_tool_calls(event: dict, parser: ToolCallStream) -> dict:
    """A chunk or done event whose text went through the tool-call splitter: the plain
    content stays ``text``; ``thinking`` and whole ``tool_calls`` are added when there are."""
    content, thinking, calls = parser.split(event["text"], final=event["type"] == "done")
    event = {**event, "text": content}
    if thinking:
        event["thinking"] = thinking
    if calls:
        event["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                               for c in calls]
    return event


def _chunk_event(request_id: int, chunk: GenerationChunk) -> dict:
    if not chunk.done:
        return {"type": "chunk", "id": request_id, "text": chunk.text,
                "token_id": chunk.token_id, "logprob": chunk.logprob}
    return {"type": "done", "id": request_id, "text": chunk.text, "token_id": chunk.token_id,
            "logprob": chunk.logprob, "done_reason": chunk.done_reason,
            "prompt_eval_count": chunk.prompt_eval_count,
            "prompt_eval_duration": chunk.prompt_eval_duration_ns,
            "eval_count": chunk.eval_count, "eval_duration": chunk.eval_duration_ns}


def _prefix_fields(loop, sequence) -> dict:
    """What a done event adds with a prefix cache: the prompt tokens read from it
    (``prompt_eval_cached_count``, Ollama's name) and the cache's counters (PrefixStats)."""
    stats = getattr(loop, "prefix_stats", lambda: None)()
    if stats is None:
        return {}
    return {"prompt_eval_cached_count": getattr(sequence, "cached_tokens", 0),
            "prefix_cache": stats}


def _error_event(request_id: int, exc: BaseException) -> dict:
    if isinstance(exc, PromptError | ValueError):  # ContextLimitError is a ValueError
        return {"type": "error", "id": request_id, "status": 400, "error": str(exc)}
    return {"type": "error", "id": request_id, "status": 500,
            "error": f"generation failed: {exc}"}


class Inbox:
    """Messages from the reader thread to the engine thread: generate and cancel messages,
    then None once the channel is closed."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, message: dict | None) -> None:
        self._queue.put(message)

    def take(self, wait: bool) -> list[dict | None]:
        """Every message there is; with ``wait``, block until there is one."""
        messages = [self._queue.get()] if wait else []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages


def _read_messages(channel: Channel, inbox: Inbox) -> None:
    try:
        for message in channel:
            if message.get("type") in ("generate", "cancel"):
                inbox.put(message)
    except (OSError, ValueError) as exc:
        log.warning("daemon channel broken", extra={"error": str(exc)})
    inbox.put(None)  # the daemon closed the channel: exit


class _InFlight:
    """Request ids the engine thread is serving, and which of them are cancelled."""

    def __init__(self):
        self.live: set[int] = set()
        self.cancelled: set[int] = set()
        self.parsers: dict[int, ToolCallStream] = {}  # requests with tools

    def cancel(self, request_id: int) -> None:
        if request_id in self.live:  # ids not in flight are ignored
            self.cancelled.add(request_id)

    def finish(self, request_id: int) -> None:
        self.live.discard(request_id)
        self.cancelled.discard(request_id)
        self.parsers.pop(request_id, None)


def _take_request(engine, loop, make, message: dict, model: str, channel: Channel,
                  flight: _InFlight) -> None:
    request_id = message["id"]
    try:
        prompt = render_prompt(engine, message, model)  # once: the sequence and the parser
        sequence = make(engine, loop, message, model, prompt,
                        lambda: request_id in flight.cancelled)
        parser = tool_parser(engine, message, prompt[0])
    except (PromptError, ValueError) as exc:
        channel.send(_error_event(request_id, exc))
        return
    except Exception as exc:  # noqa: BLE001 - e.g. a template that fails to render
        log.exception("request setup failed", extra={"model": model})
        channel.send(_error_event(request_id, exc))
        return
    flight.live.add(request_id)
    if parser is not None:
        flight.parsers[request_id] = parser
    loop.add(sequence)


def serve(engine, channel: Channel, model: str, options: LoopOptions | None = None,
          identity: str | None = None) -> None:
    """Serve requests on this thread, the engine's only one, until the daemon closes the
    channel; raises the OSError of a send that failed. ``identity``: the model and its
    quantization, as the prefix cache's keys name them (None: this engine object)."""
    options = options or LoopOptions()
    loop, make = _loop_for(engine, options)
    if identity is not None and getattr(loop, "prefix", None) is not None:
        loop.identity = identity  # before any block is stored under the loop's own
    inbox, flight = Inbox(), _InFlight()
    threading.Thread(target=_read_messages, args=(channel, inbox), daemon=True,
                     name="daemon-channel").start()
    while True:
        for message in inbox.take(wait=not loop.has_work()):
            if message is None:  # the daemon is gone: the requests in flight end here
                _log_stats(loop, model)
                return
            if message["type"] == "cancel":
                flight.cancel(message["id"])
            else:
                _take_request(engine, loop, make, message, model, channel, flight)
        for emitted in loop.step():
            request_id = emitted.generation.key
            if emitted.error is not None:
                if not isinstance(emitted.error, PromptError | ValueError):
                    log.error("generation failed", exc_info=emitted.error,
                              extra={"model": model})
                channel.send(_error_event(request_id, emitted.error))
                flight.finish(request_id)
            else:
                event = _chunk_event(request_id, emitted.chunk)
                if emitted.chunk.done:
                    event.update(_prefix_fields(loop, emitted.generation))
                parser = flight.parsers.get(request_id)
                channel.send(_with_tool_calls(event, parser) if parser else event)
                if emitted.chunk.done:
                    flight.finish(request_id)


def _log_stats(loop, model: str) -> None:
    stats = loop.stats
    if stats.decode_steps:
        log.info("decode steps", extra={
            "model": model, "steps": stats.decode_steps, "tokens": stats.decode_tokens,
            "prefill_chunks": stats.prefill_chunks,
            "mean_batch": round(stats.decode_tokens / stats.decode_steps, 2)})
    prefix = getattr(loop, "prefix_stats", lambda: None)()
    if prefix is not None:
        log.info("prefix cache", extra={"model": model, **prefix})


def loop_options(engine, args: argparse.Namespace) -> LoopOptions:
    """The generation loop's settings from the runner's arguments; the engine's defaults
    (prefill chunk by device, KV budget from free memory) where they are not given."""
    settings = {"max_batch": args.num_parallel, "step_token_budget": args.step_token_budget,
                "prefill_chunk_tokens": args.prefill_chunk_tokens,
                "kv_budget_bytes": args.kv_budget_bytes}
    if not _is_krasis_engine(engine):  # a streaming-only engine keeps no KV for the loop
        return LoopOptions(**{k: v for k, v in settings.items() if v is not None})
    if settings["kv_budget_bytes"] is None:
        settings["kv_budget_bytes"] = engine.default_kv_budget_bytes()
    settings["prefix_cache_bytes"] = args.prefix_cache_bytes \
        if args.prefix_cache_bytes is not None else default_prefix_cache_bytes()
    return engine.loop_options(**settings)


def model_identity(engine, args: argparse.Namespace) -> str:
    """What the prefix cache's keys name: the model, its folder, quantization, device and
    dtype (one runner serves one model; the key says so anyway)."""
    dtype = getattr(engine, "dtype", None)
    return f"{args.model}|{args.model_dir}|{args.quant}|{args.device}|{dtype}"


def _vram_bytes() -> int:
    """GPU memory this runner holds (0 without CUDA), for /api/ps."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_reserved())


def _num_parallel_arg(text: str) -> int:
    try:
        return num_parallel_value(text, text=True)
    except ValueError as exc:  # argparse shows only an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of bytes (0 or more), got {text!r}")
    return value


def _gpu_dense_arg(text: str) -> str:
    try:
        return gpu_dense_value(text)
    except ValueError as exc:  # argparse shows only an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="krasis-runner")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--loader", default=DEFAULT_RUNNER_LOADER)
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--gpu-cache-dir", default=None)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--num-parallel", type=_num_parallel_arg, default=1)
    parser.add_argument("--gpu-dense", type=_gpu_dense_arg, default=DEFAULT_GPU_DENSE)
    # the engine's GPU settings (EngineOptions); unset: the engine's defaults
    parser.add_argument("--vram-budget", type=_positive_int_arg, default=None)  # bytes
    parser.add_argument("--gpu-prefill-min-tokens", type=_positive_int_arg,
                        default=DEFAULT_GPU_PREFILL_MIN_TOKENS)
    parser.add_argument("--moe-autotune", choices=("on", "off"), default="on")
    parser.add_argument("--tuning-dir", default=None)  # unset: timed tiles are not kept
    # the generation loop (krasisd.engine.loop); unset: the engine's defaults
    parser.add_argument("--prefill-chunk-tokens", type=_positive_int_arg, default=None)
    parser.add_argument("--step-token-budget", type=_positive_int_arg, default=None)
    parser.add_argument("--kv-budget-bytes", type=_positive_int_arg, default=None)
    # the prefix cache's host memory (krasisd.engine.prefix_cache); 0: off; unset: the default
    parser.add_argument("--prefix-cache-bytes", type=_bytes_arg, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a runner process."""
    args = _parse_args(argv)
    from krasisd.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        from setproctitle import setproctitle

        setproctitle(f"krasis-runner {args.model}")
    except ImportError:
        log.warning("setproctitle is not installed; the process keeps its python title")
    channel = Channel(socket.socket(fileno=args.fd))
    started = time.monotonic()
    try:
        engine = load_engine(args)
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, which reports it to the user
        log.exception("model load failed", extra={"model": args.model})
        channel.send({"type": "load_error", "error": str(exc) or type(exc).__name__})
        return 1
    if getattr(engine, "tokenizer", None) is None:
        channel.send({"type": "load_error", "error": "the model folder has no tokenizer"})
        return 1
    load_ms = (time.monotonic() - started) * 1000
    log.info("model loaded", extra={"model": args.model, "pid": os.getpid(), "load_ms": load_ms})
    try:
        try:
            options = loop_options(engine, args)
        except ValueError as exc:  # e.g. a step token budget below --num-parallel
            channel.send({"type": "load_error", "error": str(exc)})
            return 1
        ready = {"type": "ready", "pid": os.getpid(), "vram_bytes": _vram_bytes(),
                 "num_parallel": args.num_parallel}
        if options.prefix_cache_bytes and _is_krasis_engine(engine):
            ready["prefix_cache"] = {"bytes": 0, "blocks": 0, "hit_rate": 0.0,
                                     "capacity_bytes": options.prefix_cache_bytes}
        channel.send(ready)
        serve(engine, channel, args.model, options, model_identity(engine, args))
    except OSError as exc:
        log.info("daemon went away; runner exits", extra={"model": args.model, "error": str(exc)})
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
