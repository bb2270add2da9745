"""A Hugging Face model folder with random weights in the real shapes of a config, for benches
that go through ``krasis create`` like a user's download would, and prompts of exact token
counts for it.

The checkpoint holds what the engine's loader expects (the names and shapes it checks, dense
and routed experts, one safetensors shard per layer so memory stays at one layer), bf16,
norms at 1. The tokenizer is a word-level one with one word per id of the config's vocabulary
(``w123``; the config's BOS id as ``<bos>``), so every token a random model samples decodes to
text of its own and streams as one line, and a prompt of N words is N tokens plus the BOS.
The folder's config.json has no end-of-sequence id: random weights would otherwise end some
answers early, at random, and a bench asks for exactly ``num_predict`` tokens.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STD = 0.02
FORMAT = 2  # of the folder's files; a folder of another format is written again


def read_bench_config(model: str) -> dict:
    """A config of bench/configs by name (``deepseek-v2-lite``) or any config.json path."""
    path = Path(model)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{model}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ValueError(f"no config {model!r}: give a config.json path or one of {names}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "architectures" not in config:
        raise ValueError(f"{path} is not a Hugging Face config.json (no architectures)")
    return config


def tensor_shapes(config: dict) -> dict[int | None, dict[str, tuple[int, ...]]]:
    """Checkpoint names and shapes the loader expects, by layer (None: embeddings, final norm,
    output head)."""
    import torch

    from krasisd.engine.config import ModelConfig
    from krasisd.engine.loader import expert_names
    from krasisd.engine.models import build_model

    parsed = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = build_model(parsed)
    shards: dict[int | None, dict[str, tuple[int, ...]]] = {None: {}}
    for name, tensor in model.state_dict().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        shards.setdefault(layer, {})[name] = tuple(tensor.shape)
    if parsed.tie_word_embeddings:
        shards[None].pop("lm_head.weight", None)
    for layer in range(parsed.num_hidden_layers):
        if parsed.is_moe_layer(layer):
            shards.setdefault(layer, {}).update(expert_names(parsed, layer, {}))
    return shards


def checkpoint_bytes(config: dict) -> int:
    """Bytes of the bf16 checkpoint ``write_model`` writes for ``config``."""
    return 2 * sum(math.prod(shape) for shapes in tensor_shapes(config).values()
                   for shape in shapes.values())


def write_model(folder: Path, config: dict, seed: int = 0) -> Path:
    """Random bf16 weights, config.json and the word tokenizer in ``folder``; returns it.
    A folder that already holds a complete checkpoint of the same config is kept."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / ".complete"
    stamp = {"format": FORMAT, "config": config}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return folder
    need_bytes = checkpoint_bytes(config)
    free_bytes = shutil.disk_usage(folder).free
    if free_bytes < need_bytes * 1.05:
        raise OSError(f"{folder}: the checkpoint needs {need_bytes / 1e9:.1f} GB, "
                      f"{free_bytes / 1e9:.1f} GB are free (--work elsewhere, or --layers N)")
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for layer, shapes in tensor_shapes(config).items():
        shard = "other.safetensors" if layer is None else f"layer{layer:03d}.safetensors"
        tensors = {name: _random(shape, name, gen) for name, shape in shapes.items()}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    written = {key: value for key, value in config.items() if key != "eos_token_id"}
    (folder / "config.json").write_text(json.dumps(written, indent=1))
    write_word_tokenizer(folder, config)
    done.write_text(json.dumps(stamp))
    return folder


def _random(shape: tuple[int, ...], name: str, gen):
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 1.0 / math.sqrt(shape[-1]) if name.endswith("mlp.gate.weight") else STD
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_word_tokenizer(folder: Path, config: dict) -> None:
    """tokenizer.json (word level, one word per id of the vocabulary, no end-of-sequence
    token) and tokenizer_config.json; encode adds the BOS when the config has one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(int(config["vocab_size"]))}
    bos = config.get("bos_token_id")
    if bos is not None:
        del vocab[f"w{bos}"]
        vocab["<bos>"] = bos
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<bos>" if bos is not None else "w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>" if bos is not None else None, "model_max_length": 1 << 20,
                "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


class PromptMaker:
    """Prompts of exactly N tokens (as the runner encodes a raw prompt: with the special tokens
    the tokenizer adds) for the tokenizer in ``folder``: words that encode as one token each,
    drawn at random so that no two prompts share a prefix."""

    SCAN_IDS = 20000  # ids looked at for one-token words (a BPE vocabulary has plenty early on)

    def __init__(self, folder: Path):
        from krasisd.engine.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_dir(folder)
        self.words = self._one_token_words()
        if len(self.words) < 16:
            raise ValueError(f"the tokenizer in {folder} has too few one-token words "
                             f"({len(self.words)}) to build prompts")
        self.added = len(self.tokenizer.encode(self.words[0])) - 1  # BOS and the like

    def _one_token_words(self) -> list[str]:
        tok = self.tokenizer
        words = []
        for token_id in range(min(tok.vocab_size, self.SCAN_IDS)):
            text = tok.decode([token_id]).strip()
            if text.isascii() and text.isalnum() and tok.encode(
                    " " + text, add_special_tokens=False) == [token_id]:
                words.append(" " + text)
        return words

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def prompt(self, n_tokens: int, seed: int) -> str:
        """A prompt of exactly ``n_tokens`` tokens; ValueError when none can be made."""
        rng = random.Random(seed)
        n_words = n_tokens - self.added
        if n_words < 1:
            raise ValueError(f"a prompt needs more than {self.added} tokens")
        words = [rng.choice(self.words) for _ in range(n_words)]
        for _ in range(8):  # words that merge across their boundary: add words until exact
            text = "".join(words)
            short = n_tokens - self.count(text)
            if short == 0:
                return text
            if short < 0:
                words = words[:short]
            else:
                words += [rng.choice(self.words) for _ in range(short)]
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens")
