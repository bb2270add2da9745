"""Streaming generation over a scripted fake engine (and a real tiny model when loadable)."""

import pytest
import torch
from test_tokenizer import train_bytelevel, write_model_dir

from krasisd.engine.detokenize import REPLACEMENT_CHAR
from krasisd.engine.generate import StopStringFilter, generate_stream
from krasisd.engine.loop import decode_one_by_one
from krasisd.engine.options import SamplingOptions
from krasisd.engine.tokenizer import Tokenizer

GREEDY = dict(temperature=0, repeat_penalty=1.0)


class FakeCache:
    def __init__(self, max_tokens):
        self.max_tokens = max_tokens
        self.length = 0


class ScriptedEngine:
    """Greedy decoding reproduces ``script`` after any prompt: the logits at absolute
    position p put a clear maximum on script[p + 1 - prompt_len]; other logits are noise."""

    def __init__(self, tokenizer, script, eos_token_ids=(), vocab_size=None, noise_seed=0):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.script = list(script)
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.noise = torch.randn(4096, self.vocab_size,
                                 generator=torch.Generator().manual_seed(noise_seed))  # [P, V]
        self.prompt_len = None
        self.forward_lengths = []

    def new_cache(self, max_tokens):
        return FakeCache(max_tokens)

    def forward(self, input_ids, cache, last_only=False):
        assert input_ids.dtype == torch.long and input_ids.dim() == 1
        if self.prompt_len is None:
            self.prompt_len = len(input_ids)
        start = cache.length
        cache.length += len(input_ids)
        assert cache.length <= cache.max_tokens, "forward past the cache"
        self.forward_lengths.append(len(input_ids))
        logits = self.noise[start:cache.length].clone()  # [T, V]
        for row, pos in enumerate(range(start, cache.length)):
            step = pos + 1 - self.prompt_len
            if 0 <= step < len(self.script):
                logits[row, self.script[step]] = 20.0
        return logits[-1:] if last_only else logits

    decode_batch = decode_one_by_one


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(write_model_dir(tmp_path_factory.mktemp("tok"), train_bytelevel()))


def run(engine, prompt, should_cancel=None, **options):
    chunks = list(generate_stream(engine, prompt, SamplingOptions(**options), should_cancel))
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    assert chunks[-1].token_id is None and all(c.token_id is not None for c in chunks[:-1])
    return chunks[:-1], chunks[-1]


def text_of(chunks, final):
    return "".join(c.text for c in chunks) + final.text


def test_greedy_streams_the_script_with_whole_characters(tokenizer):
    script = tokenizer.encode(" Hello 中文 🎉 naïve world", add_special_tokens=False)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    engine = ScriptedEngine(tokenizer, script)
    chunks, final = run(engine, prompt, num_predict=len(script), **GREEDY)
    assert [c.token_id for c in chunks] == script
    assert text_of(chunks, final) == " Hello 中文 🎉 naïve world"
    assert not any(REPLACEMENT_CHAR in c.text for c in chunks)
    assert any(c.text == "" for c in chunks)  # some characters span several tokens
    assert all(c.logprob is not None and c.logprob <= 0 for c in chunks)
    assert final.done_reason == "length"
    assert final.eval_count == len(script) and final.prompt_eval_count == len(prompt)
    assert final.prompt_eval_duration_ns > 0 and final.eval_duration_ns > 0
    # one prefill, then one token per step; the last token is never forwarded
    assert engine.forward_lengths == [len(prompt)] + [1] * (len(script) - 1)


def test_eos_stops_and_is_not_emitted(tokenizer):
    eos = tokenizer.eos_token_id
    script = tokenizer.encode(" done", add_special_tokens=False) + [eos] + [5, 6, 7]
    chunks, final = run(ScriptedEngine(tokenizer, script, {eos}), [1, 2], **GREEDY)
    assert final.done_reason == "stop"
    assert text_of(chunks, final) == " done" and eos not in [c.token_id for c in chunks]
    assert final.eval_count == len(chunks) == len(script) - 4


@pytest.mark.parametrize("stop,expected", [
    (["STOP"], "abc "), (["xyz", "OP d"], "abc ST"), (["中"], "abc STOP def "),
    (["STOPX"], "abc STOP def 中文 end"), (["end!"], "abc STOP def 中文 end"),
])
def test_stop_strings_end_the_text_before_them(tokenizer, stop, expected):
    script = tokenizer.encode("abc STOP def 中文 end", add_special_tokens=False)
    chunks, final = run(ScriptedEngine(tokenizer, script), [1], stop=stop,
                        num_predict=len(script), **GREEDY)
    assert text_of(chunks, final) == expected
    stopped = expected != "abc STOP def 中文 end"
    assert final.done_reason == ("stop" if stopped else "length")


def test_text_that_may_start_a_stop_string_is_held_back():
    stops = StopStringFilter(["</end>"])
    assert stops.push("hello <") == ("hello ", False)
    assert stops.push("/e") == ("", False)
    assert stops.push("x") == ("</ex", False)
    assert stops.push("a</en") == ("a", False)
    assert stops.push("d> tail") == ("", True)
    assert stops.hit


def test_num_predict_limits_new_tokens(tokenizer):
    script = tokenizer.encode("one two three four five six", add_special_tokens=False)
    chunks, final = run(ScriptedEngine(tokenizer, script), [1, 2, 3], num_predict=4, **GREEDY)
    assert [c.token_id for c in chunks] == script[:4]
    assert final.done_reason == "length" and final.eval_count == 4


def test_num_predict_zero_generates_nothing(tokenizer):
    chunks, final = run(ScriptedEngine(tokenizer, [5, 6]), [1, 2], num_predict=0, **GREEDY)
    assert chunks == [] and final.done_reason == "length" and final.prompt_eval_count == 2


def test_generation_stops_at_the_context_end(tokenizer):
    engine = ScriptedEngine(tokenizer, list(range(10, 40)))
    chunks, final = run(engine, [1, 2, 3, 4], num_ctx=9, **GREEDY)
    assert len(chunks) == 5 and final.done_reason == "length"  # 4 + 5 = num_ctx tokens


def test_prompt_filling_the_context_generates_nothing(tokenizer):
    chunks, final = run(ScriptedEngine(tokenizer, [5]), [1, 2, 3], num_ctx=3, **GREEDY)
    assert chunks == [] and final.done_reason == "length"


def test_prompt_longer_than_the_context_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="num_ctx=3"):
        generate_stream(ScriptedEngine(tokenizer, [5]), [1, 2, 3, 4],
                        SamplingOptions(num_ctx=3))


@pytest.mark.parametrize("prompt,match", [
    ([], "empty"), ([1, -2], "non-negative"), ([1, "a"], "non-negative"),
])
def test_bad_prompts_are_value_errors(tokenizer, prompt, match):
    with pytest.raises(ValueError, match=match):
        generate_stream(ScriptedEngine(tokenizer, [5]), prompt, SamplingOptions())


def test_stop_strings_without_a_tokenizer_are_a_value_error(tokenizer):
    engine = ScriptedEngine(tokenizer, [5])
    engine.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        generate_stream(engine, [1], SamplingOptions(stop=["x"]))
    chunks, final = run(engine, [1], num_predict=1, **GREEDY)
    assert [c.token_id for c in chunks] == [5] and final.text == ""


def test_cancellation_is_checked_every_token(tokenizer):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 3

    chunks, final = run(ScriptedEngine(tokenizer, list(range(10, 40))), [1], should_cancel,
                        **GREEDY)
    # asked once per loop step: the prompt's (token 1), then tokens 2 and 3, then cancelled
    assert final.done_reason == "cancel" and len(chunks) == 3
    assert final.eval_count == 3


def test_seeded_sampling_repeats_and_differs_by_seed(tokenizer):
    def sample(seed):
        engine = ScriptedEngine(tokenizer, [], noise_seed=1)
        chunks, _ = run(engine, [1, 2], temperature=1.0, top_k=0, seed=seed, num_predict=12)
        return [c.token_id for c in chunks]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_repeat_penalty_sees_the_prompt(tokenizer):
    # the script's tokens are strongly favoured, but a huge penalty on prompt tokens moves the
    # choice away from a token that appears in the prompt
    engine = ScriptedEngine(tokenizer, [7, 7, 7])
    chunks, _ = run(engine, [7, 8], num_predict=1, temperature=0, repeat_penalty=1000.0)
    assert chunks[0].token_id != 7


def tiny_deepseek_dir(path, tokenizer_backend):
    """A random DeepSeek-V2 MoE written by transformers, with the test tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    vocab_size = tokenizer_backend.get_vocab_size()
    config = transformers.DeepseekV2Config(
        vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, topk_method="greedy", max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tokenizer_backend.token_to_id("<s>"),
        eos_token_id=tokenizer_backend.token_to_id("</s>"), pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(config).float().eval()
    with torch.no_grad():  # wider weights than the default init, so argmax ties are unlikely
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.08)
    model.save_pretrained(path, safe_serialization=True)
    write_model_dir(path, tokenizer_backend)
    return model


def test_real_tiny_deepseek_model_streams_transformers_greedy_tokens(tmp_path):
    from krasisd import engine as engine_pkg

    model = tiny_deepseek_dir(tmp_path, train_bytelevel())
    engine = engine_pkg.load(tmp_path, quant="none", device="cpu")
    prompt = engine.tokenizer.encode("Mixture of experts 中文", add_special_tokens=False)
    chunks, final = run(engine, prompt, num_predict=12, **GREEDY)
    tokens = [c.token_id for c in chunks]
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                   eos_token_id=sorted(engine.eos_token_ids), pad_token_id=0)
    expected = reference[0, len(prompt):].tolist()
    eos_at = [i for i, t in enumerate(expected) if t in engine.eos_token_ids]
    expected = expected[:eos_at[0]] if eos_at else expected
    assert tokens == expected and len(tokens) >= 4
    assert final.done_reason == ("stop" if eos_at else "length")
    assert text_of(chunks, final) == engine.tokenizer.decode(tokens)
    assert final.prompt_eval_count == len(prompt) and final.eval_count == len(tokens)
