"""The measurements of bench/serve.py, each one through a running krasisd: requests go over its
Unix socket as a user's client sends them (raw prompts of exact token counts, greedy, streamed)
and every figure is the median of ``runs`` repetitions.

Definitions (times by the client's clock unless said otherwise):
- first token: request sent to the first token line;
- prefill tok/s: the runner's prompt_eval_count / prompt_eval_duration;
- decode tok/s: token lines after the first / time from the end of the runner's prefill
  (request sent + its prompt_eval_duration) to the last line (served.StreamResult);
- inter-token latency (ITL): gaps between consecutive token lines; p50 and p99 by nearest rank;
- streams: ``n`` requests sent at once; total tok/s is all their tokens over the time from
  sending them to the last token of any (their prefills included, as a user sees them);
- long prompt under load: ``busy`` streams decode, then a long prompt arrives; the gaps of the
  busy streams that overlap the time from its arrival to its first token are "during".
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass

from served import StreamResult, loaded, post_json, rss_bytes, stream

GENERATE = "/api/generate"


def percentile(values, fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in (0, 1]): the smallest value with at least that
    share of the values at or below it; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def median(values) -> float | None:
    """Median of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Target:
    """The model under test and how to build its prompts."""

    model: str
    prompts: object  # synthetic_folder.PromptMaker
    seed: int = 0

    def body(self, n_prompt: int, n_predict: int, salt: int, keep_alive=-1) -> dict:
        self.seed += 1
        text = self.prompts.prompt(n_prompt, seed=self.seed * 1000 + salt)
        return {"model": self.model, "prompt": text, "raw": True, "stream": True,
                "keep_alive": keep_alive,
                "options": {"num_predict": n_predict, "num_ctx": n_prompt + n_predict + 8,
                            "temperature": 0, "seed": 1}}


def check(result: StreamResult, what: str) -> StreamResult:
    if not result.ok:
        raise RuntimeError(f"{what}: HTTP {result.status}: {result.error}")
    return result


async def first_request(http, target: Target, n_prompt: int) -> dict:
    """A request to a model not loaded: time to its first token (runner start, load, kernel
    tuning when the tuning folder is empty, prefill) and the daemon's load_duration."""
    result = check(await stream(http, GENERATE, target.body(n_prompt, 1, 0)), "first request")
    return {"ttft_s": result.ttft_s, "load_s": (result.counter("load_duration") or 0) / 1e9}


async def unload(http, model: str) -> None:
    status, body = await post_json(http, GENERATE, {"model": model, "keep_alive": 0,
                                                    "stream": False})
    if status != 200:
        raise RuntimeError(f"unloading {model}: HTTP {status}: {body}")


async def prefill(http, target: Target, n_prompt: int, runs: int) -> dict:
    results = [check(await stream(http, GENERATE, target.body(n_prompt, 1, run)),
                     f"prefill {n_prompt}") for run in range(runs)]
    counted = {r.counter("prompt_eval_count") for r in results}
    return {"ttft_s": median(r.ttft_s for r in results),
            "prefill_tok_s": median(r.prefill_tok_s() for r in results),
            "prompt_tokens": counted.pop() if len(counted) == 1 else sorted(counted)}


async def decode(http, target: Target, context: int, n_decode: int, runs: int) -> dict:
    results = [check(await stream(http, GENERATE, target.body(context, n_decode, run)),
                     f"decode at {context}") for run in range(runs)]
    gaps = [g for r in results for g in r.gaps_s]

    def runner_tok_s(r: StreamResult):
        count, ns = r.counter("eval_count"), r.counter("eval_duration")
        return count / (ns / 1e9) if count and ns else None

    return {"ttft_s": median(r.ttft_s for r in results),
            "tok_s": median(r.decode_tok_s() for r in results),
            "runner_tok_s": median(runner_tok_s(r) for r in results),
            "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99),
            "tokens": median(len(r.token_times_s) for r in results)}


async def streams(http, target: Target, n_streams: int, context: int, n_decode: int,
                  runs: int) -> dict:
    per_run = []
    for run in range(runs):
        results = await asyncio.gather(*[
            stream(http, GENERATE, target.body(context, n_decode, run * 100 + i))
            for i in range(n_streams)])
        for result in results:
            check(result, f"{n_streams} streams")
        lasts = [r.token_times_s[-1] for r in results if r.token_times_s]
        tokens = sum(len(r.token_times_s) for r in results)
        span_s = max(lasts) - min(r.sent_s for r in results) if lasts else 0
        gaps = [g for r in results for g in r.gaps_s]
        per_run.append({"total_tok_s": tokens / span_s if span_s > 0 else None,
                        "stream_tok_s": median(r.decode_tok_s() for r in results),
                        "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99)})
    return {key: median(run[key] for run in per_run) for key in per_run[0]}


async def long_prompt_under_load(http, target: Target, busy: int, context: int,
                                 long_tokens: int, runs: int, busy_tokens: int = 512,
                                 warm_tokens: int = 4, after_s: float = 0.5) -> dict:
    """``busy`` streams decode (a stream that ends, at ``busy_tokens`` or an end-of-sequence,
    is followed by another); once each has ``warm_tokens`` tokens a ``long_tokens`` prompt
    arrives; the streams are cut ``after_s`` after its first token."""
    per_run = []
    for run in range(runs):
        stop = asyncio.Event()
        slots: list[list[StreamResult]] = [[] for _ in range(busy)]
        tasks = [asyncio.ensure_future(_keep_busy(http, target, context, busy_tokens,
                                                  run * 100 + i, stop, slots[i]))
                 for i in range(busy)]
        try:
            await _until_each_has(tasks, slots, warm_tokens, timeout_s=600)
            long = check(await stream(http, GENERATE, target.body(long_tokens, 1, run + 7)),
                         "long prompt under load")
            await asyncio.sleep(after_s)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        start_s, end_s = long.sent_s, long.sent_s + long.ttft_s
        before, during = [], []
        for result in (r for slot in slots for r in slot):
            times = result.token_times_s
            for a, b in zip(times, times[1:], strict=False):
                if b <= start_s:
                    before.append(b - a)
                elif a < end_s:
                    during.append(b - a)
        per_run.append({"long_ttft_s": long.ttft_s, "itl_p99_before_s": percentile(before, 0.99),
                        "itl_p99_during_s": percentile(during, 0.99),
                        "max_gap_during_s": max(during, default=None)})
    return {key: median(run[key] for run in per_run) for key in per_run[0]}


async def _keep_busy(http, target: Target, context: int, tokens: int, salt: int,
                     stop: asyncio.Event, results: list[StreamResult]) -> None:
    """Streams one after another until ``stop``; each one's result is appended as it starts."""
    while not stop.is_set():
        result = StreamResult()
        results.append(result)
        await stream(http, GENERATE, target.body(context, tokens, salt + 1000 * len(results)),
                     stop=stop, result=result)
        if result.error:
            raise RuntimeError(f"busy stream: HTTP {result.status}: {result.error}")


async def _until_each_has(tasks, slots: list[list[StreamResult]], tokens: int,
                          timeout_s: float) -> None:
    """Wait until every slot's streams have ``tokens`` token lines in all; the error of a slot
    that failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for task in tasks:
            if task.done():
                task.result()  # raises the slot's error
        if min(sum(len(r.token_times_s) for r in slot) for slot in slots) >= tokens:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"busy streams did not reach {tokens} tokens in {timeout_s:.0f} s")


async def memory(http, model: str, daemon_pid: int) -> dict:
    """Runner RSS and peak RSS (/proc of the pid /api/ps gives), VRAM (/api/ps's size_vram),
    daemon RSS."""
    entry = await loaded(http, model)
    out = {"daemon_rss_bytes": rss_bytes(daemon_pid)}
    if entry is None:
        return out
    pid = entry.get("pid")
    out.update(runner_pid=pid, vram_bytes=entry.get("size_vram"),
               runner_rss_bytes=rss_bytes(pid) if pid else None,
               runner_peak_bytes=rss_bytes(pid, "VmHWM") if pid else None)
    return out

