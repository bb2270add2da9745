"""A soak of krasisd: a mixed load for a fixed time, then what happened.

Concurrent clients send streamed generations and chats (some cut mid-stream by closing the
connection), OpenAI-shaped requests, reads of /api/show and /api/ps, and bad inputs (malformed
JSON, a body that is not an object, bad option values and field types, bad and unknown model
names, refused OpenAI fields, a wrong method; unknown options, which are ignored), while the runner is killed with SIGKILL now and then
(its pid from /api/ps). Each outcome is compared with what docs/api.md promises:
a bad input gets its 400 or 404, a request whose runner was killed ends with an error line or
a 500 naming the runner, everything else completes. Printed: requests by kind and outcome,
errors by status, unexpected outcomes with their messages, daemon and runner RSS at the start
and the end, and whether the daemon still answers a normal request afterwards.

    python3 bench/soak.py                         # own daemon, krasis-tiny, 60 s
    python3 bench/soak.py --seconds 600 --clients 8 --kill-every 20
    python3 bench/soak.py --socket $XDG_RUNTIME_DIR/krasis/krasisd.sock --model my-model

Bounded: --seconds of load, at most --max-requests requests, each waited on for at most
--request-timeout seconds; loopback only (a Unix socket). The exit status is 1 when an outcome
was unexpected or the daemon stopped answering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench_cli import log, positive_int
from served import LocalDaemon, loaded, post_json, progress, rss_bytes, session, stream

# kind: (weight, expected statuses). Bodies are in request_for().
KINDS = {
    "generate": (30, {200}),
    "chat": (15, {200}),
    "cut": (15, {200}),
    "openai": (10, {200}),
    "bad-json": (5, {400}),
    "not-object": (4, {400}),
    "bad-option": (6, {400}),
    "unknown-option": (2, {200}),  # logged and ignored (docs/api.md, Options)
    "bad-type": (4, {400}),
    "bad-name": (5, {400}),
    "unknown-model": (6, {404}),
    "bad-openai": (3, {400}),
    "wrong-method": (2, {405}),
    "show": (3, {200}),
    "ps": (3, {200}),
}
NOT_STREAMED = ("openai", "bad-openai", "wrong-method", "show", "ps")  # one JSON answer
RUNNER_DIED = ("stopped unexpectedly", "runner", "was unloaded")


@dataclass
class Tally:
    """Outcomes by kind and status; unexpected ones keep their first messages."""

    sent: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    statuses: Counter = field(default_factory=Counter)  # status of errors
    unexpected: list = field(default_factory=list)
    tokens: int = 0
    kills: int = 0

    def add(self, kind: str, outcome: str, status: int, message: str | None = None,
            expected: bool = True) -> None:
        self.outcomes[(kind, outcome)] += 1
        if status != 200 or outcome.startswith("error"):
            self.statuses[status] += 1
        if not expected:
            self.unexpected.append(f"{kind}: HTTP {status}: {message}")


def request_for(kind: str, model: str, rng: random.Random) -> tuple[str, str, object]:
    """(method, path, body) of one request of ``kind``; a str body is sent as it is, a dict as
    JSON, None is no body."""
    options = {"num_predict": rng.randint(4, 48), "seed": rng.randint(0, 1 << 20)}
    prompt = rng.choice(["What is a module?", "Explain list comprehensions.",
                         "def main():", "The os.path module"])
    messages = [{"role": "user", "content": prompt}]
    generate = "/api/generate"
    if kind in ("generate", "cut"):
        return "POST", generate, {"model": model, "prompt": prompt, "options": options}
    if kind == "chat":
        return "POST", "/api/chat", {"model": model, "options": options, "messages": messages}
    if kind == "openai":
        return "POST", "/v1/chat/completions", {"model": model, "messages": messages,
                                                "max_tokens": options["num_predict"]}
    if kind == "bad-json":
        return "POST", generate, rng.choice(['{"model": "x", "prompt": ', "{", "nul", '{"a":1}}'])
    if kind == "not-object":
        return "POST", "/api/chat", rng.choice(["[1, 2]", '"text"', "42"])
    if kind == "bad-option":
        bad = rng.choice([{"temperature": "hot"}, {"top_k": -5}, {"num_ctx": "big"},
                          {"top_p": [1]}, {"num_predict": 1.5}])
        return "POST", generate, {"model": model, "prompt": prompt, "options": bad}
    if kind == "unknown-option":
        extra = rng.choice([{"no_such_option": 1}, {"mirostat": 2}])
        return "POST", generate, {"model": model, "prompt": prompt,
                                  "options": {**options, **extra}}
    if kind == "bad-type":
        return "POST", generate, rng.choice([{"model": model, "prompt": 123},
                                             {"model": 7, "prompt": prompt},
                                             {"model": model, "prompt": prompt, "stream": "yes"}])
    if kind == "bad-name":
        name = rng.choice(["../../etc/passwd", "/abs/path", "a/b/c", "back\\slash", ""])
        return "POST", generate, {"model": name, "prompt": prompt}
    if kind == "unknown-model":
        return "POST", generate, {"model": f"no-such-model-{rng.randint(0, 999)}",
                                  "prompt": prompt}
    if kind == "bad-openai":
        return "POST", "/v1/chat/completions", rng.choice([
            {"model": model, "n": 2, "messages": messages},
            {"model": model, "messages": "not a list"},
            {"model": model, "messages": messages, "max_tokens": -3}])
    if kind == "wrong-method":
        return "POST", rng.choice(["/api/ps", "/api/tags", "/api/version"]), None
    if kind == "show":
        return "POST", "/api/show", {"model": model}
    if kind == "ps":
        return "GET", "/api/ps", None
    raise ValueError(f"unknown kind {kind}")


async def one_request(http, kind: str, model: str, rng: random.Random, tally: Tally,
                      timeout_s: float) -> None:
    method, path, body = request_for(kind, model, rng)
    expected = KINDS[kind][1]
    tally.sent[kind] += 1
    try:
        if kind in NOT_STREAMED:
            status, answer = await asyncio.wait_for(_answer(http, method, path, body),
                                                    timeout_s)
            error = None if status == 200 else str(answer.get("error"))
            result_ok, tokens = status == 200, 0
        else:
            cut = rng.randint(1, 8) if kind == "cut" else None
            result = await asyncio.wait_for(stream(http, path, body, cut_after_tokens=cut),
                                            timeout_s)
            status, error, tokens = result.status, result.error, len(result.token_times_s)
            result_ok = result.ok
    except asyncio.TimeoutError:
        tally.add(kind, "timeout", 0, f"no answer in {timeout_s:.0f} s", expected=False)
        return
    tally.tokens += tokens
    sent = body if isinstance(body, str) or body is None else json.dumps(body)
    what = f"{method} {path} {(sent or '')[:120]}"
    if status in expected and status != 200:
        tally.add(kind, f"refused {status}", status)
    elif status == 200 and 200 not in expected:  # a bad input served, whatever came after
        tally.add(kind, "served, not refused", status, f"{what} -> {error}", expected=False)
    elif result_ok and status in expected:
        tally.add(kind, "ok", status)
    elif error and any(mark in error for mark in RUNNER_DIED) and tally.kills:
        tally.add(kind, "error: runner killed", status, error)  # a kill's consequence
    else:
        tally.add(kind, f"error {status}", status, f"{what} -> {error}", expected=False)


async def _answer(http, method: str, path: str, body) -> tuple[int, dict]:
    """One request with one JSON answer ({"error": text} when the answer is not JSON)."""
    if isinstance(body, dict):
        return await post_json(http, path, body)
    async with http.request(method, path, data=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, {"error": text[:300]}


async def client(http, model: str, seed: int, deadline: float, tally: Tally, budget: list,
                 timeout_s: float) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        await one_request(http, rng.choices(kinds, weights)[0], model, rng, tally, timeout_s)


async def killer(http, model: str, every_s: float, deadline: float, tally: Tally) -> None:
    """SIGKILL the model's runner every ``every_s`` seconds (when one is loaded)."""
    started = time.monotonic()
    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s)
        entry = await loaded(http, model)
        if entry and entry.get("pid"):
            try:
                os.kill(entry["pid"], signal.SIGKILL)
                tally.kills += 1
                log(f"  killed runner {entry['pid']} at {time.monotonic() - started:.0f} s")
            except ProcessLookupError:
                pass


async def memory(http, model: str, daemon_pid: int | None) -> str:
    """RSS of the daemon (and its open files: sockets left open would grow them) and of the
    model's runner."""
    entry = await loaded(http, model)
    daemon = (f"daemon {_mib(rss_bytes(daemon_pid))}, {_open_files(daemon_pid)} open files"
              if daemon_pid else "daemon (not ours)")
    if entry is None:
        return f"{daemon}, no runner loaded"
    return f"{daemon}, runner {entry['pid']} {_mib(rss_bytes(entry['pid']))}"


def _open_files(pid: int) -> int | str:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return "?"


def _mib(value: int | None) -> str:
    return "gone" if value is None else f"{value / (1 << 20):.0f} MiB RSS"


async def soak(args, socket_path: Path, daemon_pid: int | None) -> int:
    tally = Tally()
    async with session(socket_path, read_timeout_s=args.request_timeout) as http:
        if args.pull:
            await progress(http, "/api/pull", {"model": args.model}, log=log)
        warm = await stream(http, "/api/generate", {"model": args.model, "prompt": "Hello",
                                                    "options": {"num_predict": 4}})
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: HTTP {warm.status}: {warm.error}")
        start_memory = await memory(http, args.model, daemon_pid)
        started = time.monotonic()
        deadline = started + args.seconds
        budget = [args.max_requests]
        tasks = [client(http, args.model, args.seed + i, deadline, tally, budget,
                        args.request_timeout) for i in range(args.clients)]
        if args.kill_every > 0:
            tasks.append(killer(http, args.model, args.kill_every, deadline, tally))
        await asyncio.gather(*tasks)
        elapsed_s = time.monotonic() - started
        after = await stream(http, "/api/generate", {"model": args.model, "prompt": "Hello",
                                                     "options": {"num_predict": 4}})
        end_memory = await memory(http, args.model, daemon_pid)
    print_report(args, tally, elapsed_s, start_memory, end_memory, after)
    return 1 if tally.unexpected or not after.ok else 0


def print_report(args, tally: Tally, elapsed_s: float, start_memory: str, end_memory: str,
                 after) -> None:
    served = sum(n for (_, outcome), n in tally.outcomes.items() if outcome == "ok")
    refused = sum(n for (_, outcome), n in tally.outcomes.items()
                  if outcome.startswith("refused"))
    log(f"soak: {sum(tally.sent.values())} requests in {elapsed_s:.1f} s from {args.clients} "
        f"clients, {tally.kills} runner kills, {tally.tokens} tokens streamed")
    log(f"served {served}, refused as documented {refused}, "
        f"unexpected {len(tally.unexpected)}")
    log("| kind | sent | outcomes |")
    log("| --- | ---: | --- |")
    for kind in KINDS:
        outcomes = ", ".join(f"{outcome} {n}" for (k, outcome), n in sorted(tally.outcomes.items())
                             if k == kind)
        log(f"| {kind} | {tally.sent[kind]} | {outcomes or '-'} |")
    names = {0: "no answer", 200: "200 then an error line"}
    statuses = ", ".join(f"{names.get(status, status)}: {n}"
                         for status, n in sorted(tally.statuses.items()))
    log(f"errors by status: {statuses or 'none'}")
    for message in Counter(tally.unexpected).most_common(10):
        log(f"unexpected ({message[1]}x): {message[0][:300]}")
    log(f"memory at the start: {start_memory}")
    log(f"memory at the end:   {end_memory}")
    log("after the soak a normal request " + ("completed" if after.ok else
                                            f"FAILED: HTTP {after.status}: {after.error}"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_int, default=60, help="length of the load")
    parser.add_argument("--clients", type=positive_int, default=4, help="concurrent clients")
    parser.add_argument("--kill-every", type=float, default=15.0,
                        help="seconds between runner kills (0: none)")
    parser.add_argument("--model", default="krasis-tiny")
    parser.add_argument("--socket", type=Path,
                        help="an existing daemon's socket (default: start one in a new home)")
    parser.add_argument("--max-requests", type=positive_int, default=20000)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kill_every < 0:
        parser.error("--kill-every must be 0 or more")
    args.pull = args.socket is None  # our own daemon starts empty
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.socket is not None:
        return asyncio.run(soak(args, args.socket, None))
    with tempfile.TemporaryDirectory(prefix="krasis-soak-") as home:
        daemon = LocalDaemon(Path(home)).start()
        failed = True
        try:
            status = asyncio.run(soak(args, daemon.socket, daemon.pid))
            failed = False
        finally:
            code = daemon.stop()
            log(f"daemon stopped with exit status {code}")
            if failed or code != 0:
                log(f"the daemon's log ends with:\n{daemon.log_tail(30)}")
    return status if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
