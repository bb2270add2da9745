"""A tiny random DeepSeek-V2 folder with a byte-level tokenizer and a chat template.

Written with transformers and tokenizers (not by krasis), so the daemon's end-to-end tests
load a real Hugging Face folder through the real registry and engine.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(folder: Path) -> int:
    """Byte-level BPE without merges: 256 byte tokens plus <s> and </s>; returns the size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return len(vocab)


def write_model(folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer DeepSeek-V2 (MLA, 4 routed + 1 shared experts) into ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder)
    config = transformers.DeepseekV2Config(
        vocab_size=vocab_size, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=256,
        moe_intermediate_size=128, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=512, topk_method="greedy",
        routed_scaling_factor=1.0, tie_word_embeddings=False, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(config).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder
