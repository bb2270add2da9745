"""Per-step token-mask cost of grammar-constrained decoding, for the candidate libraries.

For one JSON schema with a few typed fields, each library that is importable
(llguidance, outlines-core, xgrammar) compiles the schema for a tokenizer, then walks a valid
answer token by token: at every step it computes the allowed-token bitmask (timed) and
consumes the answer's next token. The bitmask is then applied to a logits vector [V] (timed
apart: krasisd.engine.constrained's ``apply_bitmask``). Tokenizers: the bundled krasis-tiny
(2,048 tokens) and a byte-level BPE of about 150K tokens trained here on this Python's own
library sources (25 s on one core, cached), so no model is downloaded.

The budget: at 100 tok/s a decode step is 10 ms, and 5 % of it is 0.5 ms per step.

    python3 bench/grammar_mask.py [--libraries llguidance,outlines-core,xgrammar]
        [--vocab 150000] [--repeats 20] [--cache-dir ~/.cache/krasis-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import site
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_cli import log, make_dir, positive_int  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from krasisd.engine.constrained import GrammarPick, apply_bitmask, grammar_tokenizer  # noqa: E402
from krasisd.engine.options import SamplingOptions  # noqa: E402
from krasisd.engine.sampling import Sampler  # noqa: E402
from krasisd.engine.tokenizer import Tokenizer as KrasisTokenizer  # noqa: E402
from krasisd.grammars import json_schema_grammar  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "registry" / "bundled" / "krasis-tiny"
BUDGET_MS = 0.5  # 5 % of a 10 ms step (100 tok/s)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "active", "tags", "role"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "score": 98.5,
          "active": True, "tags": ["math", "engines", "poetry"], "role": "admin"}


def build_bpe(vocab_size: int, out: Path) -> Path:
    """A byte-level BPE of ``vocab_size`` tokens trained on this Python's library sources."""
    path = out / f"bpe{vocab_size}" / "tokenizer.json"
    if path.is_file():
        return path
    roots = {Path(os.__file__).parent, *map(Path, site.getsitepackages())}
    files, total = [], 0
    for file in sorted({f.resolve() for root in roots for f in root.rglob("*.py")}):
        size = file.stat().st_size
        if size < 2_000_000:
            files.append(file)
            total += size
        if total > 120_000_000:
            break
    log(f"training a {vocab_size}-token BPE on {total / 1e6:.0f} MB of {len(files)} files")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    start = time.perf_counter()
    tok.train_from_iterator(
        (f.read_text(encoding="utf-8", errors="ignore") for f in files), trainer,
        length=len(files))
    log(f"trained in {time.perf_counter() - start:.1f} s: {tok.get_vocab_size()} tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte, as ByteLevel vocabularies spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tok: Tokenizer) -> list[bytes | None]:
    """Each id's bytes (None for special tokens), for libraries that take a raw vocabulary."""
    decoder = _byte_decoder()
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out: list[bytes | None] = [None] * tok.get_vocab_size()
    for text, token_id in tok.get_vocab().items():
        if text not in specials:
            out[token_id] = bytes(decoder[c] for c in text)
    return out


def walk_llguidance(tok: Tokenizer, eos: int, answer_ids: list[int]):
    import llguidance
    import llguidance.torch as llg_torch

    start = time.perf_counter()
    ll_tok = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
    tokenizer_s = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    bitmask = llg_torch.allocate_token_bitmask(1, tok.get_vocab_size())

    def steps():
        matcher.reset()
        for token_id in answer_ids:
            t0 = time.perf_counter_ns()
            llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
            yield time.perf_counter_ns() - t0, bitmask[0]
            if not matcher.consume_token(token_id):
                raise RuntimeError(matcher.get_error())

    return tokenizer_s, compile_s, steps


def walk_outlines(tok: Tokenizer, eos: int, answer_ids: list[int]):
    import outlines_core
    from outlines_core.kernels.torch import allocate_token_bitmask

    start = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(token_bytes(tok)):
        if data is not None and token_id != eos:
            vocab.setdefault(data, []).append(token_id)
    vocabulary = outlines_core.Vocabulary(eos, vocab)
    tokenizer_s = time.perf_counter() - start
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    start = time.perf_counter()
    index = outlines_core.Index(regex, vocabulary)
    compile_s = time.perf_counter() - start
    bitmask = allocate_token_bitmask(tok.get_vocab_size())

    def steps():
        guide = outlines_core.Guide(index)
        for token_id in answer_ids:
            t0 = time.perf_counter_ns()
            guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
            yield time.perf_counter_ns() - t0, bitmask[0]
            guide.advance(token_id)

    return tokenizer_s, compile_s, steps


def walk_xgrammar(tok: Tokenizer, eos: int, answer_ids: list[int]):
    import xgrammar as xgr

    start = time.perf_counter()
    vocab = [""] * tok.get_vocab_size()
    for text, token_id in tok.get_vocab().items():
        vocab[token_id] = text
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def steps():
        matcher = xgr.GrammarMatcher(compiled)
        for token_id in answer_ids:
            t0 = time.perf_counter_ns()
            matcher.fill_next_token_bitmask(bitmask, 0)
            yield time.perf_counter_ns() - t0, bitmask[0]
            if not matcher.accept_token(token_id):
                raise RuntimeError(f"xgrammar refused token {token_id}")

    return tokenizer_s, compile_s, steps


WALKS = {"llguidance": walk_llguidance, "outlines-core": walk_outlines,
         "xgrammar": walk_xgrammar}


def _eos(tok: Tokenizer) -> int:
    eos = tok.token_to_id("<|eos|>")
    return tok.token_to_id("<|endoftext|>") if eos is None else eos


def measure(name: str, tok: Tokenizer, libraries: list[str], repeats: int) -> None:
    eos = _eos(tok)
    answer_ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False).ids
    vocab = tok.get_vocab_size()
    logits = torch.randn(vocab)  # [V]
    for library, walk in WALKS.items():
        if library not in libraries:
            continue
        try:
            tokenizer_s, compile_s, steps = walk(tok, eos, answer_ids)
        except ImportError as exc:
            log(f"{name:>10} {library:>14}: not installed ({exc.name})")
            continue
        mask_ns, apply_ns, first_ns = [], [], []
        for _ in range(repeats):
            for step, (fill_ns, bitmask) in enumerate(steps()):
                (mask_ns if step else first_ns).append(fill_ns)
                t0 = time.perf_counter_ns()
                apply_bitmask(logits, bitmask)
                apply_ns.append(time.perf_counter_ns() - t0)
        mask_ms = [n / 1e6 for n in mask_ns]
        p50, p95 = statistics.median(mask_ms), statistics.quantiles(mask_ms, n=20)[-1]
        apply_ms = statistics.median(apply_ns) / 1e6
        verdict = "within" if p50 + apply_ms <= BUDGET_MS else "OVER"
        log(f"{name:>10} V={vocab:>6} {library:>14}: tokenizer {tokenizer_s * 1e3:8.1f} ms, "
            f"compile {compile_s * 1e3:8.1f} ms, mask/step p50 {p50:.3f} ms, p95 {p95:.3f} ms, "
            f"max {max(mask_ms):.3f} ms, first step {first_ns[0] / 1e6:.3f} ms, "
            f"apply p50 {apply_ms:.3f} ms; {len(answer_ids)} steps x {repeats}; "
            f"{verdict} the {BUDGET_MS} ms budget")


class _BenchEngine:
    """What GrammarPick reads of an engine: the tokenizer, EOS ids, the logits' size."""

    def __init__(self, tok: Tokenizer):
        self.tokenizer = KrasisTokenizer(tok)
        self.eos_token_ids = {_eos(tok)}
        self.config = type("Config", (), {"vocab_size": tok.get_vocab_size()})()


def measure_pick(name: str, tok: Tokenizer, repeats: int) -> None:
    """GrammarPick's whole step (catch-up, mask, apply, draw, consume) against the plain
    Sampler's draw on the same logits, with Ollama's default sampling options; the logits
    favour the answer's next token so the walk follows the answer."""
    engine = _BenchEngine(tok)
    answer_ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False).ids
    options = SamplingOptions(seed=0)  # temperature 0.8, top_k 40, top_p 0.9, repeat 1.1
    start = time.perf_counter()
    grammar_tokenizer(engine)
    tokenizer_s = time.perf_counter() - start
    grammar = json_schema_grammar(SCHEMA)
    prompt = tok.encode("Describe Ada as JSON.", add_special_tokens=False).ids
    generator = torch.Generator().manual_seed(0)
    pick_ns, sample_ns = [], []
    for _ in range(repeats):
        pick = GrammarPick(engine, grammar, options, prompt_length=len(prompt))
        sampler = Sampler(options)
        history = list(prompt)
        for token_id in answer_ids:
            logits = torch.randn(tok.get_vocab_size(), generator=generator)  # [V]
            logits[token_id] = 30.0
            t0 = time.perf_counter_ns()
            sampler.sample(logits, history)
            t1 = time.perf_counter_ns()
            picked, _, _ = pick(logits, history)
            t2 = time.perf_counter_ns()
            if picked != token_id:
                raise RuntimeError(f"the walk left the answer: {picked} for {token_id}")
            sample_ns.append(t1 - t0)
            pick_ns.append(t2 - t1)
            history.append(token_id)
    pick_ms, sample_ms = statistics.median(pick_ns) / 1e6, statistics.median(sample_ns) / 1e6
    extra = pick_ms - sample_ms
    log(f"{name:>10} V={tok.get_vocab_size():>6} GrammarPick step p50 {pick_ms:.3f} ms vs "
        f"Sampler {sample_ms:.3f} ms: +{extra:.3f} ms per token "
        f"({100 * extra / 10:.1f} % of a 10 ms step); tokenizer built in "
        f"{tokenizer_s * 1e3:.0f} ms (once per model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", default="llguidance,outlines-core,xgrammar",
                        type=lambda s: s.split(","))
    parser.add_argument("--vocab", type=positive_int, default=150_000,
                        help="size of the locally trained BPE")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "krasis-bench"))
    args = parser.parse_args()
    unknown = set(args.libraries) - set(WALKS)
    if unknown:
        parser.error(f"--libraries: unknown {sorted(unknown)}; known: {sorted(WALKS)}")
    torch.set_num_threads(1)
    log(f"schema: {len(SCHEMA['properties'])} typed fields; budget {BUDGET_MS} ms per step")
    cache = make_dir(parser, Path(args.cache_dir).expanduser(), "--cache-dir")
    for name, path in (("tiny", TINY / "tokenizer.json"), ("bpe", build_bpe(args.vocab, cache))):
        tok = Tokenizer.from_file(str(path))
        measure(name, tok, args.libraries, args.repeats)
        measure_pick(name, tok, args.repeats)


if __name__ == "__main__":
    main()
