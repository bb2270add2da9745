"""A small random DeepSeek-V2 model (transformers' own code), as a folder and as a repo's files."""

import json
from pathlib import Path

DECOYS = {
    "pytorch_model.bin": b"\x80\x02pickle weights are never fetched",
    "modeling_deepseek.py": b"raise SystemExit('remote code must never be fetched')\n",
    "onnx/model.onnx": b"onnx weights live in a sub-folder and are never fetched",
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}


def write_tiny_model(out_dir: Path, vocab_size: int = 2048, seed: int = 0,
                     max_shard_size: str = "1MB", moe_intermediate_size: int = 32) -> Path:
    """save_pretrained a tiny DeepseekV2ForCausalLM (two shards) plus a word-level tokenizer.

    Hidden size 64; the default expert width, 32, is one INT4 cannot hold (it needs
    multiples of 64), so the registry serves it as INT8; 64 makes a model INT4 holds."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
    )
    model = DeepseekV2ForCausalLM(config)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return out_dir


def repo_files(model_dir: Path, decoys: bool = True) -> dict[str, bytes]:
    """The files a Hub repo of this model would hold, decoys included."""
    files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}
    if decoys:
        files.update(DECOYS)
    return files
