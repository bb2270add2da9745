"""The runner serving several requests at once over one channel, with a real (tiny, random)
engine: answers equal those of each request alone, decode steps are shared, cancel is per
request, and the channel closing stops everything."""

from __future__ import annotations

import queue
import socket
import threading
from pathlib import Path

import pytest
import torch

from krasisd import runner
from krasisd.config import Config
from krasisd.engine.batch import BatchingEngine
from krasisd.engine.config import ModelConfig
from krasisd.engine.engine import Engine
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.synthetic import (
    TINY_DEEPSEEK_V2,
    synthetic_expert_weights,
    synthetic_model,
)
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
    """serve() on a thread over a socket pair; this side plays the daemon."""

    def __init__(self, engine, num_parallel: int, monkeypatch):
        self.wrapped: list = []
        make = runner.batching_engine

        def capture(inner, n):
            self.wrapped.append(make(inner, n))
            return self.wrapped[-1]

        monkeypatch.setattr(runner, "batching_engine", capture)
        self.daemon_side, runner_side = socket.socketpair()
        self.channel = runner.Channel(self.daemon_side)
        self.events: dict[int, queue.Queue] = {}
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       args=(engine, runner.Channel(runner_side), num_parallel))
        self.thread.start()
        threading.Thread(target=self._read, daemon=True).start()

    def _serve(self, engine, channel, num_parallel):
        try:
            runner.serve(engine, channel, "tiny", num_parallel)
        except OSError as exc:  # the test closed its side mid-send
            self.failure.append(exc)

    def _read(self):
        for event in self.channel:
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

    def make(num_parallel: int) -> Session:
        sessions.append(Session(engine, num_parallel, monkeypatch))
        return sessions[-1]

    yield make
    for session in sessions:
        if session.thread.is_alive():
            session.close()


def _alone(engine, prompt: str, fmt: str | None = None, **options) -> str:
    text, add_special = runner.render_prompt(engine, {"prompt": prompt}, "tiny")
    opts = SamplingOptions(**{**OPTIONS, **options})
    ids = runner.prompt_ids(engine, text, add_special, opts.num_ctx)
    return "".join(c.text for c in runner.generation(engine, ids, opts, fmt, lambda: False))


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
    batching = session.wrapped[0]
    assert isinstance(batching, BatchingEngine) and batching.max_batch == 4
    assert batching.stats.prefills == 4
    assert batching.stats.tokens > batching.stats.steps  # steps held more than one sequence
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
    assert session.wrapped[0].max_batch == 2
    session.close()


def test_channel_close_stops_requests_in_flight(engine, session_factory):
    session = session_factory(2)
    session.send(1, PROMPTS[0], options={"num_predict": 10_000, "num_ctx": 20_000})
    assert session.first(1)["type"] == "chunk"
    session.close()  # returns only when serve() did


def test_engines_without_the_batching_surface_are_used_as_they_are(engine):
    class Plain:
        def generate(self, prompt_ids, options, should_cancel=None):
            return iter(())

    plain = Plain()
    assert runner.batching_engine(plain, 4) is plain
    assert runner.batching_engine(engine, 1) is engine
    wrapped = runner.batching_engine(engine, 3)
    assert isinstance(wrapped, BatchingEngine) and wrapped.engine is engine
    with pytest.raises(ValueError, match="num_parallel"):
        runner.serve(engine, None, "tiny", 0)


def test_runner_is_started_with_the_setting():
    spec = ModelSpec(name="m", model_dir=Path("/m"))
    argv = _runner_argv(spec, Config(num_parallel=3), fd=3)
    assert argv[argv.index("--num-parallel") + 1] == "3"
    assert runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m"]).num_parallel == 1
    with pytest.raises(SystemExit):
        runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                            "--num-parallel", "0"])
