"""The Engine API end to end on a tiny model folder with a tokenizer and a chat template."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_hf import make_hf_model, save_hf_model
from tokenizers import Tokenizer, models, pre_tokenizers

from krasisd.engine import Engine, load
from krasisd.engine.options import SamplingOptions

pytest.importorskip("transformers")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    torch.set_num_threads(1)
    model_dir = save_hf_model(make_hf_model("qwen3-moe"), tmp_path_factory.mktemp("m"))
    words = ["<s>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(92)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    loaded = load(model_dir, threads=1)
    yield loaded
    loaded.close()


def test_tokenizer_and_eos_are_loaded(engine):
    assert engine.tokenizer is not None
    assert engine.tokenizer.encode("w5 w7", add_special_tokens=False) == [9, 11]
    assert 1 in engine.eos_token_ids


def test_chat_prompt_renders_the_model_template(engine):
    text = engine.chat_prompt([{"role": "user", "content": "w3 w4"}])
    assert text == "<s><user> w3 w4 <assistant>"


def test_generate_streams_what_greedy_returns(engine):
    ids = engine.tokenizer.encode("w10 w11 w12", add_special_tokens=False)
    expected = engine.greedy(ids, max_new_tokens=8)
    options = SamplingOptions(temperature=0.0, num_predict=8, repeat_penalty=1.0)
    chunks = list(engine.generate(ids, options))
    tokens = [c.token_id for c in chunks if c.token_id is not None]
    assert tokens == expected
    assert chunks[-1].done and chunks[-1].prompt_eval_count == len(ids)
    assert chunks[-1].eval_count == len(expected)
