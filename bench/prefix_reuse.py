"""First-token time of a long prompt sent again with new tokens appended, with and without the
prefix cache (krasisd.engine.prefix_cache), through the generation loop a runner drives.

An editor or chat client re-sends its whole context every turn: without the cache the whole
prompt is prefilled again; with it only the blocks past the cached ones are. The figure is
the time from adding the request to its first token (the prefill, or the block copies and
the new tokens' prefill), and the prompt tokens forwarded.

    python3 bench/prefix_reuse.py                       # krasis-tiny, int4, 1 thread
    python3 bench/prefix_reuse.py --prompt-tokens 1950 --new-tokens 50 --repeats 5
    python3 bench/prefix_reuse.py --daemon $XDG_RUNTIME_DIR/krasis/krasisd.sock
        # through a running krasisd (raw /api/generate, krasis-tiny pulled first); start it
        # with KRASIS_PREFIX_CACHE=0 for the figures without the cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from krasisd.engine import load  # noqa: E402
from krasisd.engine.generate import Generation  # noqa: E402
from krasisd.engine.loop import GenerationLoop  # noqa: E402
from krasisd.engine.options import SamplingOptions  # noqa: E402

TINY = ROOT / "registry" / "bundled" / "krasis-tiny"


def _text_tokens(tokenizer, count: int, skip: int = 0) -> list[int]:
    """``count`` token ids of Python's documentation text (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer.encode(topics[name], add_special_tokens=False)
        if len(ids) >= skip + count:
            return ids[skip:skip + count]
    raise SystemExit(f"the documentation text has fewer than {skip + count} tokens")


def _first_token_ms(loop: GenerationLoop, engine, prompt: list[int]) -> tuple[float, int]:
    """(ms from adding the request to its first token, prompt tokens forwarded)."""
    before = loop.stats.prefill_tokens
    options = SamplingOptions(temperature=0, num_predict=1, num_ctx=len(prompt) + 8)
    start = time.perf_counter()
    loop.add(Generation(engine, prompt, options))
    first_ms = None
    while loop.has_work():
        for emitted in loop.step():
            if emitted.error is not None:
                raise emitted.error
            if first_ms is None and emitted.chunk.token_id is not None:
                first_ms = (time.perf_counter() - start) * 1000
    return first_ms, loop.stats.prefill_tokens - before


def _daemon(args, engine_tokens) -> int:
    """The same prompts as raw /api/generate requests to the daemon at ``args.daemon``."""
    import json

    import httpx

    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(args.daemon)),
                        base_url="http://localhost", timeout=600)
    pulled = http.post("/api/pull", json={"model": "krasis-tiny"}).text.splitlines()
    if json.loads(pulled[-1]).get("status") != "success":
        raise SystemExit(f"pulling krasis-tiny failed: {pulled[-1]}")

    def first_token_ms(prompt: str) -> tuple[float, int]:
        body = {"model": "krasis-tiny", "prompt": prompt, "raw": True,
                "options": {"temperature": 0, "num_predict": 4, "num_ctx": 2048}}
        start, first_ms = time.perf_counter(), None
        with http.stream("POST", "/api/generate", json=body) as response:
            for line in response.iter_lines():
                event = json.loads(line)
                if first_ms is None and event.get("response"):
                    first_ms = (time.perf_counter() - start) * 1000
                if event.get("done"):
                    return first_ms, event["prompt_eval_count"]
        raise SystemExit("the answer ended without a done event")

    tokenizer, base, extended = engine_tokens
    first_token_ms("warm up")
    for round_index in range(args.repeats):
        # a context of its own each round: the first send is never cached
        marker = tokenizer.encode(f"round {round_index} {time.time_ns()}: ",
                                  add_special_tokens=False)
        ms_first, count_first = first_token_ms(tokenizer.decode(marker + base))
        ms_again, count_again = first_token_ms(tokenizer.decode(marker + extended))
        print(f"first send {ms_first:.0f} ms ({count_first} prompt tokens), sent again with "
              f"{args.new_tokens} more {ms_again:.0f} ms ({count_again})")
    models = http.get("/api/ps").json()["models"]
    print("prefix_cache in /api/ps:", models[0].get("prefix_cache") if models else None)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=TINY)
    parser.add_argument("--quant", default="int4", choices=("none", "int8", "int4"))
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: stored)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the CPU expert cache (default: a temporary folder)")
    parser.add_argument("--prompt-tokens", type=int, default=1950)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--daemon", type=Path, default=None,
                        help="a running krasisd's socket: measure through it instead")
    args = parser.parse_args()
    if args.daemon is not None:
        from krasisd.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(TINY)
        base = _text_tokens(tokenizer, args.prompt_tokens)
        extended = base + _text_tokens(tokenizer, args.new_tokens, skip=len(base))
        return _daemon(args, (tokenizer, base, extended))

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        engine = load(args.model_dir, quant=args.quant, threads=args.threads,
                      cache_dir=args.cache_dir or Path(scratch), dtype=args.dtype)
        base = _text_tokens(engine.tokenizer, args.prompt_tokens)
        extended = base + _text_tokens(engine.tokenizer, args.new_tokens, skip=len(base))
        print(f"{args.model_dir.name}, quant={args.quant}, dtype={engine.dtype}, "
              f"threads={args.threads}: a {len(base)}-token prompt, then it again with "
              f"{args.new_tokens} new tokens; median of {args.repeats}")
        rows = []
        for label, prefix_bytes in (("no prefix cache", 0), ("prefix cache", 1 << 30)):
            firsts, seconds, forwarded = [], [], 0
            for _ in range(args.repeats):
                loop = GenerationLoop(engine, engine.loop_options(
                    prefix_cache_bytes=prefix_bytes), engine.context_spec())
                firsts.append(_first_token_ms(loop, engine, base)[0])
                ms, forwarded = _first_token_ms(loop, engine, extended)
                seconds.append(ms)
            rows.append((label, statistics.median(firsts), statistics.median(seconds),
                         forwarded))
        print(f"{'':18}{'first send':>14}{'sent again':>14}{'tokens forwarded':>20}")
        for label, first, second, forwarded in rows:
            print(f"{label:18}{first:>11.0f} ms{second:>11.0f} ms{forwarded:>20}")
        print(f"speed-up of the second send: {rows[0][2] / rows[1][2]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
