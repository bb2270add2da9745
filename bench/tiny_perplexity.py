"""Held-out perplexity of the bundled krasis-tiny through the krasis engine: float, INT8, INT4.

The held-out documents are those of scripts/train_tiny.py (same split, same text cleaning),
encoded with the bundled tokenizer, scored in non-overlapping windows of 256 tokens exactly as
the training script scores them; only the engine and the routed-expert format change.

    python3 bench/tiny_perplexity.py [--threads 1] [--quants none,int8,int4]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "registry" / "bundled" / "krasis-tiny"


def _train_script():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heldout_tokens(heldout_percent: int = 5) -> torch.Tensor:
    """The held-out stream: <|bos|> text <|eos|> for each held-out document. [N]"""
    train = _train_script()
    docs = train.topic_documents() + train.docstring_documents()
    heldout = [d for d in docs if train.is_held_out(d[1], heldout_percent)]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    return train.token_stream(tok, heldout, with_chat=False)


def perplexity(engine, tokens: torch.Tensor, seq_len: int = 256) -> float:
    nll_sum, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1]  # [S+1]
        if window.shape[0] < 2:
            break
        logits = engine.logits(window[:-1].tolist())  # [S, V] float32
        nll_sum += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.shape[0] - 1
    return math.exp(nll_sum / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quants", default="none,int8,int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from krasisd.engine import load

    tokens = heldout_tokens()
    print(f"krasis-tiny held-out stream: {len(tokens)} tokens, Python {sys.version.split()[0]}")
    print("| experts | held-out perplexity | seconds |")
    print("| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as cache_dir:
        for quant in args.quants.split(","):
            engine = load(TINY, quant=quant, device="cpu", threads=args.threads,
                          cache_dir=os.path.join(cache_dir, quant), dtype="float32")
            start = time.perf_counter()
            ppl = perplexity(engine, tokens)
            print(f"| {quant} | {ppl:.2f} | {time.perf_counter() - start:.1f} |")
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
