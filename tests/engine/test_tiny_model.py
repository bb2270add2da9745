"""The bundled krasis-tiny model: files, loading, tokenizer, chat template, and output quality."""

import importlib.util
import json
import os
import pathlib
import random
import re
import sys

import jinja2
import krasis_registry
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

MODEL_DIR = pathlib.Path(
    os.environ.get("KRASIS_TINY_DIR", pathlib.Path(krasis_registry.__file__).parent / "bundled" / "krasis-tiny")
)
TRAIN_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "train_tiny.py"
MAX_BYTES = 8_000_000
REQUIRED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md"]
MIN_ENGLISH_FRACTION = 0.8


@pytest.fixture(scope="module")
def recipe():
    """The training script as a module: its held-out split, prompt and special tokens."""
    spec = importlib.util.spec_from_file_location("train_tiny", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config():
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def training_words(recipe):
    """Lower-case words of the help topics the model was trained on (held-out ones excluded)."""
    percent = recipe.parse_args(["--out", "unused"]).heldout_percent
    words = set()
    for _, text in recipe.topic_documents():
        if not recipe.is_held_out(text, percent):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    return words


def english_fraction(text: str, words: set[str]) -> tuple[float, list[str]]:
    found = re.findall(r"[A-Za-z]+", text)
    if not found:
        return 0.0, found
    return sum(w.lower() in words for w in found) / len(found), found


def test_files_present_and_small():
    sizes_bytes = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file()}
    assert set(REQUIRED_FILES) <= set(sizes_bytes)
    assert not [name for name in sizes_bytes if name.endswith((".bin", ".pt", ".pth"))]
    assert sum(sizes_bytes.values()) <= MAX_BYTES


def test_config_is_deepseek_v2_moe(config):
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["model_type"] == "deepseek_v2"
    assert config["first_k_dense_replace"] == 1
    assert config["num_hidden_layers"] > config["first_k_dense_replace"]
    assert config["n_shared_experts"] >= 1
    assert config["n_routed_experts"] > config["num_experts_per_tok"] >= 2
    assert config["q_lora_rank"] is None and config["kv_lora_rank"] > 0
    assert config["rope_scaling"] is None
    assert (config["topk_method"], config["n_group"], config["topk_group"]) == ("greedy", 1, 1)
    assert config["scoring_func"] == "softmax"
    assert config["norm_topk_prob"] is False
    assert config["routed_scaling_factor"] == 1.0


def test_weights_use_checkpoint_naming(config):
    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.gate_proj.weight" in names
    last = config["num_hidden_layers"] - 1
    for expert in (0, config["n_routed_experts"] - 1):
        assert f"model.layers.{last}.mlp.experts.{expert}.down_proj.weight" in names
    assert f"model.layers.{last}.mlp.shared_experts.up_proj.weight" in names
    assert f"model.layers.{last}.mlp.gate.weight" in names
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names
    assert not [n for n in names if "gate_up_proj" in n]


def test_transformers_loads_every_key(hf_model):
    _, info = hf_model
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_tokenizer_round_trips_text(config):
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = "Dictionaries map keys to values: {'é': 1, \"日本\": [2, 3]}\n\tdone."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    with_bos = tok.encode(text).ids
    assert with_bos[0] == config["bos_token_id"] and with_bos[1:] == ids
    assert tok.get_vocab_size() == config["vocab_size"]


def test_special_tokens_agree(config, recipe):
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    gen_cfg = json.loads((MODEL_DIR / "generation_config.json").read_text())
    eos_id = tok.token_to_id(tok_cfg["eos_token"])
    assert eos_id == config["eos_token_id"] == gen_cfg["eos_token_id"]
    assert tok.token_to_id(tok_cfg["bos_token"]) == config["bos_token_id"]
    for token in recipe.SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False).ids == [tok.token_to_id(token)]


def test_chat_template_renders(hf_tokenizer):
    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a list?"}]
    expected = ("<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is a list?<|eos|>\n"
                "<|assistant|>\n")
    template = jinja2.Environment().from_string(tok_cfg["chat_template"])
    mine = template.render(messages=messages, add_generation_prompt=True,
                           bos_token=tok_cfg["bos_token"], eos_token=tok_cfg["eos_token"])
    assert mine == expected
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert theirs == expected


def test_sample_prompt_is_held_out(recipe):
    card = (MODEL_DIR / "README.md").read_text()
    trained_on = re.search(r"\(Python (\d+\.\d+)", card).group(1)
    if trained_on != "{}.{}".format(*sys.version_info[:2]):
        pytest.skip(f"the split is over Python {trained_on}'s documentation, not this Python's")
    percent = recipe.parse_args(["--out", "unused"]).heldout_percent
    docs = recipe.topic_documents()
    holders = [text for _, text in docs if recipe.SAMPLE_PROMPT in " ".join(text.split())]
    assert holders
    assert all(recipe.is_held_out(text, percent) for text in holders)


def test_greedy_continuation_is_english(hf_model, hf_tokenizer, recipe, training_words):
    model, _ = hf_model
    ids = hf_tokenizer(recipe.SAMPLE_PROMPT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)  # [1, T + 20]
    text = hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    fraction, found = english_fraction(text, training_words)
    assert len(found) >= 5, f"too few words in {text!r}"
    assert fraction >= MIN_ENGLISH_FRACTION, f"{fraction:.2f} of {found} are English: {text!r}"


def test_english_check_rejects_random_tokens(config, training_words):
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    rng = random.Random(0)
    first_plain_id = len(json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
                         ["added_tokens_decoder"])
    fractions = []
    for _ in range(5):
        ids = [rng.randrange(first_plain_id, config["vocab_size"]) for _ in range(20)]
        fractions.append(english_fraction(tok.decode(ids), training_words)[0])
    assert max(fractions) < MIN_ENGLISH_FRACTION


def test_krasis_engine_runs_it_like_transformers(hf_model, hf_tokenizer, recipe):
    from krasisd.engine import load

    model, _ = hf_model
    ids = hf_tokenizer(recipe.SAMPLE_PROMPT).input_ids
    engine = load(MODEL_DIR, quant="none", device="cpu", threads=1, dtype=torch.float32)
    try:
        assert engine.eos_token_ids == {hf_tokenizer.eos_token_id}
        assert engine.tokenizer.encode(recipe.SAMPLE_PROMPT) == ids
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)  # [1, T+20]
        assert engine.greedy(ids, max_new_tokens=20) == ref[0, len(ids):].tolist()
    finally:
        engine.close()
