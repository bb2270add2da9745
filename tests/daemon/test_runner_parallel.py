"""The runner serving several requests at once over one channel, with a real (tiny, random)
engine: answers equal those of each request alone, decode steps are shared, cancel is per
request (also mid-prompt), num_ctx beyond the model is a 400, and the channel closing stops
everything."""

from __future__ import annotations

import queue
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from krasisd import runner
from krasisd.config import Config
from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    synthetic_expert_weights,
    synthetic_model,
)
from krasisd.engine.loop import GenerationLoop, LoopOptions
from krasisd.engine.options import SamplingOptions
from krasisd.engine.tokenizer import Tokenizer
from krasisd.jsonmode import JsonPrefix
from krasisd.runners import ModelSpec, _runner_argv

pytestmark = pytest.mark.timeout(30)

OPTIONS = {"temperature": 0.0, "num_predict": 16, "num_ctx": 64}
PROMPTS = ["Hello there", "Once upon a time", "x", "Tell me a story about a cat"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A random 4-layer DeepSeek-V2 (MLA, MoE) in float32 with a byte-level tokenizer."""
    from tiny_model import write_tokenizer

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab_size = write_tokenizer(folder)
    config = ModelConfig.from_dict({**TINY_DEEPSEEK_V2, "vocab_size": vocab_size,
                                    "bos_token_id": vocab_size - 2,
                                    "eos_token_id": vocab_size - 1})
    model = synthetic_model(config, "cpu", torch.float32, seed=0)
    experts = {layer: synthetic_expert_weights(config, layer, "cpu", 0)
               for layer in range(config.num_hidden_layers) if config.is_moe_layer(layer)}
    return Engine(config, model, TorchExperts(experts), Tokenizer.from_dir(folder),
                  {vocab_size - 1})


class Session:
    """serve() on a thread over a socket pair; this side plays the daemon. ``loops`` holds
    the generation loop serve() made."""

    def __init__(self, engine, options: LoopOptions, monkeypatch):
        self.loops: list = []
        make = runner._loop_for

        def capture(inner, opts):
            loop, build = make(inner, opts)
            self.loops.append(loop)
            return loop, build

        monkeypatch.setattr(runner, "_loop_for", capture)
        self.daemon_side, runner_side = socket.socketpair()
        self.channel = runner.Channel(self.daemon_side)
        self.events: dict[int, queue.Queue] = {}
        self.order: list[tuple[int, str]] = []  # (id, type) of every event, as they came
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       args=(engine, runner.Channel(runner_side), options))
        self.thread.start()
        threading.Thread(target=self._read, daemon=True).start()

    def _serve(self, engine, channel, options):
        try:
            runner.serve(engine, channel, "tiny", options)
        except OSError as exc:  # the test closed its side mid-send
            self.failure.append(exc)

    def _read(self):
        for event in self.channel:
            self.order.append((event["id"], event["type"]))
            self.events.setdefault(event["id"], queue.Queue()).put(event)

    def send(self, request_id: int, prompt: str, **extra) -> None:
        self.events.setdefault(request_id, queue.Queue())
        self.channel.send({"type": "generate", "id": request_id, "prompt": prompt,
                           "options": {**OPTIONS, **extra.pop("options", {})}, **extra})

    def first(self, request_id: int) -> dict:
        return self.events[request_id].get(timeout=10)

    def answer(self, request_id: int) -> tuple[str, dict]:
        """(the text of every event up to done, the done or error event)."""
        parts = []
        while True:
            event = self.events[request_id].get(timeout=20)
            parts.append(event.get("text", ""))
            if event["type"] in ("done", "error"):
                return "".join(parts), event

    def close(self) -> None:
        self.daemon_side.shutdown(socket.SHUT_RDWR)
        self.daemon_side.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve() did not return after the channel closed"


@pytest.fixture
def session_factory(engine, monkeypatch):
    sessions: list[Session] = []

    def make(num_parallel: int, engine=engine, **settings) -> Session:
        options = LoopOptions(max_batch=num_parallel, **settings)
        sessions.append(Session(engine, options, monkeypatch))
        return sessions[-1]

    yield make
    for session in sessions:
        if session.thread.is_alive():
            session.close()


def _alone(engine, prompt: str, fmt: str | None = None, **options) -> str:
    text, add_special = runner.render_prompt(engine, {"prompt": prompt}, "tiny")
    opts = SamplingOptions(**{**OPTIONS, **options})
    ids = runner.prompt_ids(engine, text, add_special, opts.num_ctx)
    if fmt == "json":
        from krasisd.jsonmode import generate_json

        return "".join(c.text for c in generate_json(engine, ids, opts, lambda: False))
    return "".join(c.text for c in engine.generate(ids, opts))


def test_concurrent_requests_share_steps_and_answer_as_alone(engine, session_factory):
    expected = [_alone(engine, p) for p in PROMPTS[:3]] + [_alone(engine, PROMPTS[3], "json")]
    session = session_factory(4)
    for i, prompt in enumerate(PROMPTS[:3], start=1):
        session.send(i, prompt)
    session.send(4, PROMPTS[3], format="json")
    answers = [session.answer(i) for i in range(1, 5)]
    assert [text for text, _ in answers] == expected
    assert all(done["type"] == "done" for _, done in answers), answers
    assert JsonPrefix().feed(answers[3][0]) is not None
    loop = session.loops[0]
    assert isinstance(loop, GenerationLoop) and loop.options.max_batch == 4
    assert loop.stats.prefill_chunks == 4
    assert loop.stats.decode_tokens > loop.stats.decode_steps  # steps held several sequences
    session.close()


def test_cancel_stops_only_its_request(engine, session_factory):
    long = {"num_predict": 40, "num_ctx": 128}
    expected = _alone(engine, PROMPTS[1], **long)
    session = session_factory(2)
    session.send(1, PROMPTS[0], options=long)
    session.send(2, PROMPTS[1], options=long)
    assert session.first(1)["type"] == "chunk"
    session.channel.send({"type": "cancel", "id": 1})
    _, cancelled = session.answer(1)
    text, done = session.answer(2)
    assert cancelled["done_reason"] == "cancel" and cancelled["eval_count"] < 40
    assert text == expected and done["done_reason"] != "cancel"
    session.close()


def test_more_requests_than_slots_wait_their_turn(engine, session_factory):
    expected = [_alone(engine, p) for p in PROMPTS]
    session = session_factory(2)
    for i, prompt in enumerate(PROMPTS, start=1):
        session.send(i, prompt)
    assert [session.answer(i)[0] for i in range(1, 5)] == expected
    assert session.loops[0].options.max_batch == 2
    session.close()


def test_channel_close_stops_requests_in_flight(engine, session_factory):
    session = session_factory(2)
    session.send(1, PROMPTS[0], options={"num_predict": 10_000, "num_ctx": 256})
    assert session.first(1)["type"] == "chunk"
    session.close()  # returns only when serve() did


def test_cancel_mid_prompt_stops_its_prefill(engine, session_factory):
    """A long prompt cancelled between two of its chunks is not prefilled further: it ends
    with "cancel" at the next step, nothing evaluated, and the other stream goes on."""
    session = session_factory(2, prefill_chunk_tokens=2)
    session.send(1, PROMPTS[0], options={"num_predict": 200, "num_ctx": 256})
    assert session.first(1)["type"] == "chunk"  # the short request is decoding
    stats = session.loops[0].stats
    before = stats.prefill_chunks
    session.send(2, "word " * 60, options={"num_ctx": 256})  # 255 tokens: 128 chunks of 2
    deadline = time.monotonic() + 10
    while stats.prefill_chunks < before + 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    session.channel.send({"type": "cancel", "id": 2})
    _, cancelled = session.answer(2)
    assert cancelled["type"] == "done" and cancelled["done_reason"] == "cancel"
    assert cancelled["prompt_eval_count"] == 0 and cancelled["eval_count"] == 0
    assert 3 <= stats.prefill_chunks - before < 100  # stopped long before its 128 chunks
    assert all(g.key != 2 for g in session.loops[0].running)
    text, done = session.answer(1)
    assert done["done_reason"] == "length" and done["eval_count"] == 200
    session.close()


def test_running_streams_keep_answering_while_a_long_prompt_is_read(engine, session_factory):
    """A long prompt read in 2-token chunks: the running stream gets a token at every one of
    those steps, before the long request's first token."""
    session = session_factory(2, prefill_chunk_tokens=2)
    session.send(1, PROMPTS[0], options={"num_predict": 220, "num_ctx": 256})
    assert session.first(1)["type"] == "chunk"
    session.send(2, "word " * 60, options={"num_ctx": 256, "num_predict": 2})  # 128 chunks
    _, done = session.answer(2)
    assert done["type"] == "done" and done["prompt_eval_count"] == 255
    order = list(session.order)
    sent_at = order.index((1, "chunk"))
    first_of_2 = order.index((2, "chunk"))
    assert sum(1 for key, _ in order[sent_at:first_of_2] if key == 1) >= 120
    session.close()


def test_num_ctx_beyond_the_model_is_a_400_naming_both_numbers(engine, session_factory):
    session = session_factory(2)
    session.send(1, "hi", options={"num_ctx": 2_000_000})
    event = session.first(1)
    assert event["type"] == "error" and event["status"] == 400
    maximum = engine.config.max_position_embeddings
    assert "2000000" in event["error"] and str(maximum) in event["error"]
    session.send(2, "hi", options={"num_ctx": None, "num_predict": 2})  # unset: a default
    assert session.answer(2)[1]["type"] == "done"
    session.close()


class _Words:
    """An engine that only streams (not a krasis Engine): "<prompt length>:<i> " words."""

    class tokenizer:  # noqa: N801 - the attribute engines have
        chat_template = ""

        @staticmethod
        def encode(text, add_special_tokens=True):
            return list(range(len(text)))

    def chat_prompt(self, messages, add_generation_prompt=True, **template_vars):
        return messages[-1]["content"]

    def generate(self, prompt_ids, options, should_cancel=None):
        from krasisd.engine.options import GenerationChunk

        for i in range(options.num_predict):
            if should_cancel():
                yield GenerationChunk(None, "", done=True, done_reason="cancel", eval_count=i)
                return
            yield GenerationChunk(i, f"{len(prompt_ids)}:{i} ")
        yield GenerationChunk(None, "", done=True, done_reason="length",
                              eval_count=options.num_predict)


def test_kv_budget_queues_what_fits_later_and_refuses_what_never_fits(engine, session_factory):
    per_token = engine.context_spec().kv_bytes_per_token
    session = session_factory(2, kv_budget_bytes=100 * per_token)
    session.send(1, "hi", options={"num_ctx": 101})
    refused = session.first(1)
    assert refused["status"] == 400 and "num_ctx 101" in refused["error"]
    assert "100 tokens" in refused["error"]
    session.send(2, "hi", options={"num_ctx": 60, "num_predict": 20})
    session.send(3, "ho", options={"num_ctx": 60, "num_predict": 20})
    assert session.answer(2)[1]["eval_count"] == 20
    assert session.answer(3)[1]["eval_count"] == 20
    order = [event for event in session.order if event[0] in (2, 3)]
    assert order.index((2, "done")) < order.index((3, "chunk"))  # 3 waited for room
    session.close()


def test_a_streaming_engine_is_served_one_chunk_per_step(session_factory):
    """Its streams interleave on the engine thread, a cancel reaches it, JSON mode is a 400."""
    session = session_factory(2, engine=_Words())
    session.send(1, "abc", options={"num_predict": 3})
    session.send(2, "abcdef", options={"num_predict": 3})
    text, done = session.answer(1)
    assert text == "3:0 3:1 3:2 " and done["done_reason"] == "length"
    assert session.answer(2)[0] == "6:0 6:1 6:2 "
    session.send(3, "x", options={"num_predict": 100_000})
    assert session.first(3)["type"] == "chunk"
    session.channel.send({"type": "cancel", "id": 3})
    assert session.answer(3)[1]["done_reason"] == "cancel"
    session.send(4, "x", format="json")
    event = session.first(4)
    assert event["status"] == 400, event
    session.close()


def test_runner_is_started_with_the_setting():
    spec = ModelSpec(name="m", model_dir=Path("/m"))
    argv = _runner_argv(spec, Config(num_parallel=3), fd=3)
    assert argv[argv.index("--num-parallel") + 1] == "3"
    assert runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m"]).num_parallel == 1
    with pytest.raises(SystemExit):
        runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                            "--num-parallel", "0"])


def test_runner_is_started_with_the_loop_settings(engine):
    """KRASIS_KV_BUDGET and KRASIS_PREFILL_CHUNK_TOKENS reach the runner's loop options;
    unset, the engine's defaults (the CPU chunk, a budget from the available memory)."""
    from krasisd.config import load_config

    cfg = load_config({"KRASIS_HOME": "/tmp/unused", "KRASIS_KV_BUDGET": "2MiB",
                       "KRASIS_PREFILL_CHUNK_TOKENS": "64", "KRASIS_NUM_PARALLEL": "3"})
    spec = ModelSpec(name="m", model_dir=Path("/m"))
    argv = _runner_argv(spec, cfg, fd=3)
    args = runner._parse_args(argv[argv.index("--fd"):])
    options = runner.loop_options(engine, args)
    assert (options.max_batch, options.prefill_chunk_tokens, options.kv_budget_bytes) == \
        (3, 64, 2 * 2**20)
    default = runner.loop_options(engine, runner._parse_args(
        ["--fd", "3", "--model", "m", "--model-dir", "/m"]))
    assert default.prefill_chunk_tokens == 512 and default.kv_budget_bytes > 0
    assert load_config({"KRASIS_HOME": "/tmp/unused", "KRASIS_KV_BUDGET": "0"}) \
        .kv_budget_bytes is None  # a bad value: the default, with a warning
