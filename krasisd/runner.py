"""A runner process: one loaded model, kept warm, serving generations for the daemon.

Started by the daemon as ``python -m krasisd.runner --fd N --model NAME ...`` (see
``krasisd.runners`` for the message protocol). A reader thread takes messages from the
daemon, so a ``cancel`` is seen between two tokens; each request runs on its own worker
thread, at most ``--num-parallel`` at once, and sends its events through the shared
:class:`Channel`. With more than one, an engine that has ``forward`` and ``new_cache`` is
wrapped in :class:`krasisd.engine.batch.BatchingEngine`, so the requests decoding at the same
time share one forward pass per step; any other engine (a plugged-in loader, a test fake) has
its ``generate`` called from several threads at once. When the daemon goes away (the channel
closes) the requests in flight stop at their next token and the runner exits.
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import ThreadPoolExecutor

# The runner is a fresh interpreter and nothing above loads torch: set OpenMP's wait policy before
# it does, or torch's spinning OpenMP workers starve the native kernels' thread pool (CPU decode
# measured 3-8x slower on 2 cores). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from krasisd.config import (  # noqa: E402
    DEFAULT_GPU_DENSE,
    DEFAULT_RUNNER_LOADER,
    gpu_dense_value,
    num_parallel_value,
)
from krasisd.engine.options import GenerationChunk, SamplingOptions  # noqa: E402

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


def load_engine(args: argparse.Namespace):
    """Import the loader ('module:function') and load the model with the daemon's settings.

    ``gpu_cache_dir`` and ``gpu_dense`` are passed only when given and not the default, so a
    plugged-in loader without those arguments keeps working with the default settings."""
    module_name, func_name = args.loader.split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
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
    return engine.chat_prompt(messages, add_generation_prompt=True, **extra), False


def prompt_ids(engine, text: str, add_special: bool, num_ctx: int) -> list[int]:
    """Tokenize; a prompt that does not fit num_ctx keeps its last num_ctx - 1 tokens."""
    ids = engine.tokenizer.encode(text, add_special_tokens=add_special)
    if len(ids) >= num_ctx:
        log.warning("prompt truncated to fit num_ctx",
                    extra={"prompt_tokens": len(ids), "num_ctx": num_ctx})
        ids = ids[len(ids) - (num_ctx - 1):]
    return ids


def generation(engine, ids: list[int], options: SamplingOptions, fmt: str | None,
               should_cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
    """The engine's stream, or the JSON-constrained one for format "json"."""
    if fmt == "json":
        from krasisd.jsonmode import generate_json

        return generate_json(engine, ids, options, should_cancel)
    return engine.generate(ids, options, should_cancel=should_cancel)


def serve_one(engine, request: dict, channel: Channel, model: str,
              should_cancel: Callable[[], bool], generator=None) -> None:
    """Run one generate request and send its chunks, its done event or its error.

    ``engine`` renders and tokenizes the prompt; ``generator`` (default: ``engine``, or the
    BatchingEngine around it) generates.
    """
    request_id = request["id"]
    try:
        options = SamplingOptions(**request["options"])
        text, add_special = render_prompt(engine, request, model)
        ids = prompt_ids(engine, text, add_special, options.num_ctx)
        for chunk in generation(generator or engine, ids, options, request.get("format"),
                                should_cancel):
            channel.send(_chunk_event(request_id, chunk))
            if chunk.done:
                return
    except (PromptError, ValueError) as exc:
        channel.send({"type": "error", "id": request_id, "status": 400, "error": str(exc)})
    except OSError:
        raise  # the channel to the daemon is gone: the runner exits
    except Exception as exc:  # noqa: BLE001 - any engine failure is this request's error
        log.exception("generation failed", extra={"model": model})
        channel.send({"type": "error", "id": request_id, "status": 500,
                      "error": f"generation failed: {exc}"})


def _chunk_event(request_id: int, chunk: GenerationChunk) -> dict:
    if not chunk.done:
        return {"type": "chunk", "id": request_id, "text": chunk.text,
                "token_id": chunk.token_id, "logprob": chunk.logprob}
    return {"type": "done", "id": request_id, "text": chunk.text, "token_id": chunk.token_id,
            "logprob": chunk.logprob, "done_reason": chunk.done_reason,
            "prompt_eval_count": chunk.prompt_eval_count,
            "prompt_eval_duration": chunk.prompt_eval_duration_ns,
            "eval_count": chunk.eval_count, "eval_duration": chunk.eval_duration_ns}


class Flight:
    """The requests a runner has taken and not finished, and which of them are cancelled;
    shared by the reader thread, the serving loop and the worker threads."""

    def __init__(self):
        self.requests: queue.Queue = queue.Queue()  # generate messages; None: stop
        self.closed = False  # the channel is gone: every request stops
        self.error: OSError | None = None  # why a worker could not send
        self._lock = threading.Lock()
        self._live: set[int] = set()
        self._cancelled: set[int] = set()

    def add(self, request: dict) -> None:
        with self._lock:
            self._live.add(request["id"])
        self.requests.put(request)

    def cancel(self, request_id: int) -> None:
        """Mark a request cancelled; ids that are not in flight are ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancelled.add(request_id)

    def is_cancelled(self, request_id: int) -> bool:
        return self.closed or request_id in self._cancelled

    def finish(self, request_id: int) -> None:
        with self._lock:
            self._live.discard(request_id)
            self._cancelled.discard(request_id)

    def close(self, error: OSError | None = None) -> None:
        """Stop taking requests; those in flight see themselves cancelled."""
        self.closed = True
        if error is not None and self.error is None:
            self.error = error
        self.requests.put(None)


def _read_messages(channel: Channel, flight: Flight) -> None:
    try:
        for message in channel:
            if message.get("type") == "generate":
                flight.add(message)
            elif message.get("type") == "cancel":
                flight.cancel(message["id"])
    except (OSError, ValueError) as exc:
        log.warning("daemon channel broken", extra={"error": str(exc)})
    flight.close()  # the daemon closed the channel: exit


def batching_engine(engine, num_parallel: int):
    """What generations run through: a BatchingEngine around ``engine`` when several
    requests may decode at once and the engine has the surface it needs, else ``engine``."""
    if num_parallel < 2 or not all(callable(getattr(engine, name, None))
                                   for name in ("forward", "new_cache")):
        return engine
    from krasisd.engine.batch import BatchingEngine

    return BatchingEngine(engine, max_batch=num_parallel)


def _serve_request(engine, generator, request: dict, channel: Channel, model: str,
                   flight: Flight) -> None:
    request_id = request["id"]
    try:
        if not flight.is_cancelled(request_id):
            serve_one(engine, request, channel, model,
                      lambda: flight.is_cancelled(request_id), generator)
    except OSError as exc:  # the channel to the daemon is gone: the runner exits
        flight.close(exc)
    finally:
        flight.finish(request_id)


def serve(engine, channel: Channel, model: str, num_parallel: int = 1) -> None:
    """Serve requests, up to ``num_parallel`` at once, until the daemon closes the channel;
    raises the OSError of a send that failed."""
    num_parallel_value(num_parallel)
    generator = batching_engine(engine, num_parallel)
    flight = Flight()
    threading.Thread(target=_read_messages, args=(channel, flight), daemon=True,
                     name="daemon-channel").start()
    with ThreadPoolExecutor(max_workers=num_parallel, thread_name_prefix="request") as pool:
        while (request := flight.requests.get()) is not None:
            pool.submit(_serve_request, engine, generator, request, channel, model, flight)
        # closed: the requests in flight stop at their next token, and the pool waits for them
    stats = getattr(generator, "stats", None)
    if stats is not None and stats.steps:
        log.info("shared decode steps", extra={"model": model, "steps": stats.steps,
                                               "tokens": stats.tokens, "prefills": stats.prefills,
                                               "mean_batch": round(stats.tokens / stats.steps, 2)})
    if flight.error is not None:
        raise flight.error


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
    channel.send({"type": "ready", "pid": os.getpid(), "vram_bytes": _vram_bytes(),
                  "num_parallel": args.num_parallel})
    try:
        serve(engine, channel, args.model, args.num_parallel)
    except OSError as exc:
        log.info("daemon went away; runner exits", extra={"model": args.model, "error": str(exc)})
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
