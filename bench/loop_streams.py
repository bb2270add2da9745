"""The generation loop on the CPU: how long running streams stall while a long prompt is
prefilled (per prefill chunk size), and the tok/s of several streams decoding together.

    OMP_WAIT_POLICY=PASSIVE python3 bench/loop_streams.py \
        [--model-dir registry/bundled/krasis-tiny] [--threads 1] [--chunks 2048,512,128]

A long prompt of ``--long-tokens`` joins ``--streams`` running streams; each chunk size prints
the longest gap between two tokens of a running stream and the time the long prompt took to
its first token. Then 1 and ``--streams`` streams decode ``--decode-tokens`` greedy tokens
each and the total tok/s is printed. The model runs in float32 with the float experts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_cli import log, positive_int, positive_ints

from krasisd.engine import load
from krasisd.engine.generate import Generation
from krasisd.engine.loop import GenerationLoop
from krasisd.engine.options import SamplingOptions

TINY = Path(__file__).resolve().parents[1] / "registry" / "bundled" / "krasis-tiny"


def _greedy(num_predict: int, num_ctx: int) -> SamplingOptions:
    return SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=num_predict,
                           num_ctx=num_ctx)


def stall(engine, chunk: int, streams: int, long_tokens: int) -> tuple[float, float]:
    """(longest gap between a running stream's tokens, seconds to the long prompt's first
    token) while a long prompt is prefilled in chunks of ``chunk``."""
    num_ctx = engine.config.max_position_embeddings
    loop = GenerationLoop(engine, engine.loop_options(max_batch=streams + 1,
                                                      prefill_chunk_tokens=chunk),
                          engine.context_spec())
    for key in range(streams):
        loop.add(Generation(engine, [5 + key, 9, 11], _greedy(-1, num_ctx), key=key))
    for _ in range(20):  # every stream is decoding
        loop.step()
    last = dict.fromkeys(range(streams), time.perf_counter())
    gaps, vocab = [], engine.config.vocab_size
    prompt = [(7 * i) % (vocab - 3) + 3 for i in range(long_tokens)]
    start = time.perf_counter()
    loop.add(Generation(engine, prompt, _greedy(1, num_ctx), key="long"))
    done = False
    while not done:
        for emitted in loop.step():
            if emitted.generation.key == "long":
                done = done or emitted.chunk.done
            elif not emitted.chunk.done:
                now = time.perf_counter()
                gaps.append(now - last[emitted.generation.key])
                last[emitted.generation.key] = now
    return max(gaps), time.perf_counter() - start


def streams_tok_s(engine, streams: int, tokens: int) -> float:
    """Total tok/s of ``streams`` greedy streams decoding ``tokens`` each, together."""
    loop = GenerationLoop(engine, engine.loop_options(max_batch=streams), engine.context_spec())
    for key in range(streams):
        loop.add(Generation(engine, [5 + key, 9, 11], _greedy(tokens, 4 * tokens), key=key))
    while any(g.prefill_left or g.next_token is None for g in [*loop.waiting, *loop.running]):
        loop.step()  # every stream has its first token
    before, start = loop.stats.decode_tokens, time.perf_counter()
    while loop.has_work():
        loop.step()
    return (loop.stats.decode_tokens - before) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=TINY)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--chunks", type=positive_ints, default=[2048, 512, 128])
    parser.add_argument("--streams", type=positive_int, default=2)
    parser.add_argument("--long-tokens", type=positive_int, default=2000)
    parser.add_argument("--decode-tokens", type=positive_int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = load(args.model_dir, quant="none", device="cpu", dtype="float32",
                  threads=args.threads)
    for chunk in args.chunks:
        gap_s, first_token_s = stall(engine, chunk, args.streams, args.long_tokens)
        log(f"chunk {chunk}: {args.long_tokens}-token prompt next to {args.streams} streams: "
            f"longest gap {1e3 * gap_s:.0f} ms, its first token after {first_token_s:.2f} s")
    for streams in sorted({1, args.streams * 2}):
        log(f"{streams} streams: {streams_tok_s(engine, streams, args.decode_tokens):.0f} "
            "tok/s total")


if __name__ == "__main__":
    main()
