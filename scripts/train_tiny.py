#!/usr/bin/env python3
"""Train krasis-tiny: a small DeepSeek-V2-architecture MoE on the English text CPython ships.

The corpus is the documentation topics in ``pydoc_data.topics`` plus the docstrings of the
standard library (read with ``ast``, nothing is imported), so training needs no network.
A slice of the documents, chosen by a hash of their text, is held out for evaluation.

    python3 scripts/train_tiny.py --out registry/bundled/krasis-tiny --steps 1500 \
        --publish-every 250 --threads 1 --seed 1234
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import logging
import math
import pathlib
import re
import shutil
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger("train_tiny")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# From the held-out help topic "Dictionary displays"; the tests use the same sentence.
SAMPLE_PROMPT = "A dictionary display is a possibly empty series of"
QUESTION_FORMS = ["Tell me about {}.", "What is {}?", "Explain {}.", "What does {} do?"]
SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test"}
TITLE_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every default is the recipe of the bundled model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=pathlib.Path, help="output model folder")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--balance-coef", type=float, default=0.01, help="expert load-balance loss")
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=5, help="1 dense layer, the rest MoE")
    p.add_argument("--experts", type=int, default=6, help="routed experts per MoE layer")
    p.add_argument("--moe-intermediate", type=int, default=128,
                   help="expert width; a multiple of 64 keeps INT4 caches possible")
    p.add_argument("--heldout-percent", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--publish-every", type=int, default=0,
                   help="also write the model to --out at every this many steps (0: only at the end)")
    args = p.parse_args(argv)
    for name in ("steps", "threads", "vocab_size", "seq_len", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers < 2:
        p.error("--layers must be at least 2 (one dense layer, then MoE layers)")
    if args.experts < 3:
        p.error("--experts must be at least 3 (each token picks 2)")
    if args.publish_every < 0:
        p.error("--publish-every must be 0 or more")
    if not 0 < args.heldout_percent < 50:
        p.error("--heldout-percent must be between 1 and 49")
    return args


def clean_text(text: str) -> str:
    """Strip trailing spaces, doctest lines and runs of blank lines."""
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if not ln.lstrip().startswith((">>>", "... "))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def topic_documents() -> list[tuple[str, str]]:
    """(title, text) for each pydoc documentation topic, titled by its heading."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = clean_text(topics[key])
        lines = text.splitlines()
        title = key.replace("-", " ")
        if len(lines) > 1 and TITLE_UNDERLINE.match(lines[1]):
            title = lines[0].strip()
            text = "\n".join(lines[2:]).strip()
        docs.append((title, text))
    return docs


def docstring_documents(min_chars: int = 120) -> list[tuple[str, str]]:
    """(dotted name, docstring) for stdlib modules, classes and functions, parsed with ast."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_STDLIB_DIRS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs.extend(_docstrings_of(tree, module, min_chars))
    return docs


def _docstrings_of(tree: ast.Module, module: str, min_chars: int) -> list[tuple[str, str]]:
    found = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= min_chars:
        found.append((f"the {module} module", clean_text(doc)))
    for node in tree.body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_"):
            continue
        members = [node] + [n for n in node.body if isinstance(n, ast.FunctionDef)]
        for member in members:
            doc = ast.get_docstring(member)
            if not doc or len(doc) < min_chars:
                continue
            name = node.name if member is node else f"{node.name}.{member.name}"
            found.append((f"{module}.{name}", clean_text(doc)))
    return found


def is_held_out(text: str, percent: int) -> bool:
    """A document is held out when the hash of its text falls in the first `percent` buckets."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def chat_sample(title: str, text: str) -> str:
    """One chat-formatted exchange: a question about `title`, answered by its first paragraph."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    question = QUESTION_FORMS[digest[0] % len(QUESTION_FORMS)].format(title)
    answer = text.split("\n\n")[0].strip()
    return f"<|user|>\n{question}{EOS}\n<|assistant|>\n{answer}{EOS}\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the special tokens first (ids 0..5); encode() prepends <|bos|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return tok


def token_stream(tok: Tokenizer, docs: list[tuple[str, str]], with_chat: bool) -> torch.Tensor:
    """All documents as one id stream: <|bos|> text <|eos|>, plus chat samples when asked."""
    pieces = [f"{BOS}{text}{EOS}" for _, text in docs]
    if with_chat:
        pieces += [f"{BOS}{chat_sample(title, text)}" for title, text in docs]
    encodings = tok.encode_batch(pieces, add_special_tokens=False)
    return torch.tensor([i for enc in encodings for i in enc.ids], dtype=torch.long)  # [N]


def build_config(args: argparse.Namespace, tok: Tokenizer):
    """The DeepseekV2Config of the model: MLA, a dense first layer, shared + routed experts."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 8 // 3 // 32 * 32,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=args.experts, num_experts_per_tok=2, first_k_dense_replace=1,
        kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD), tie_word_embeddings=False,
        architectures=["DeepseekV2ForCausalLM"],
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load balance: E * sum_e(fraction routed to e * mean probability of e)."""
    total = router_logits[0].new_zeros(())
    for logits in router_logits:  # [T, E]
        probs = logits.float().softmax(dim=-1)  # [T, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [T, A]
        routed = F.one_hot(chosen, probs.shape[-1]).float().sum(dim=1)  # [T, E]
        fraction = routed.mean(dim=0) / top_k  # [E]
        total = total + probs.shape[-1] * (fraction * probs.mean(dim=0)).sum()
    return total / len(router_logits)


def sample_batch(tokens: torch.Tensor, args, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - args.seq_len, (args.batch_size,), generator=gen)
    return torch.stack([tokens[s : s + args.seq_len] for s in starts.tolist()])  # [B, S]


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq_len: int) -> float:
    """Held-out perplexity over non-overlapping windows (every token but each window's first)."""
    model.eval()
    nll_sum, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1].unsqueeze(0)  # [1, S+1]
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window[:, :-1]).logits.float()  # [1, S, V]
        nll = F.cross_entropy(logits[0], window[0, 1:], reduction="sum")
        nll_sum, count = nll_sum + nll.item(), count + window.shape[1] - 1
    model.train()
    return math.exp(nll_sum / count)


def train(model, train_tokens, heldout_tokens, args, on_checkpoint=None) -> list[dict]:
    """AdamW with warmup and cosine decay; returns the evaluation history.

    on_checkpoint(step, history) runs every --publish-every steps before the last one.
    """
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    history, started, top_k = [], time.monotonic(), model.config.num_experts_per_tok
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sample_batch(train_tokens, args, gen)  # [B, S]
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        aux = balance_loss(out.router_logits, top_k)
        (out.loss + args.balance_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl = evaluate(model, heldout_tokens, args.seq_len)
            elapsed_s = time.monotonic() - started
            history.append({"step": step + 1, "train_loss": round(out.loss.item(), 4),
                            "balance": round(aux.item(), 4), "heldout_ppl": round(ppl, 2),
                            "elapsed_s": round(elapsed_s)})
            log.info("progress %s", json.dumps(history[-1]))
        if on_checkpoint and args.publish_every and (step + 1) % args.publish_every == 0 \
                and step + 1 < args.steps:
            on_checkpoint(step + 1, history)
        elif step % 25 == 0:
            log.info("step=%d loss=%.4f balance=%.4f lr=%.2e", step, out.loss.item(), aux.item(),
                     lr_at(step, args))
    return history


def tokenizer_config(tok: Tokenizer, max_tokens: int) -> dict:
    """tokenizer_config.json: special tokens, chat template, and the fast-tokenizer class."""
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": PAD, "unk_token": None, "model_max_length": max_tokens,
        "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def save_model(model, tok: Tokenizer, out: pathlib.Path) -> None:
    """Write the Hugging Face folder: bf16 safetensors, config, tokenizer, generation config."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    # Fields that DeepSeek's own config.json carries and engines read; transformers omits them.
    cfg.update({"scoring_func": "softmax", "moe_layer_freq": 1, "rope_scaling": None,
                "rope_theta": cfg["rope_parameters"]["rope_theta"], "torch_dtype": "bfloat16"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, cfg["max_position_embeddings"])
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
               "pad_token_id": cfg["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")


def greedy_sample(out: pathlib.Path, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of `prompt` by the saved model, loaded back with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


def write_model_card(out: pathlib.Path, facts: dict) -> None:
    """README.md of the model folder: what it is, how it was trained, how well it does."""
    rows = "\n".join(
        f"| {h['step']} | {h['train_loss']} | {h['heldout_ppl']} | {h['elapsed_s']} |"
        for h in facts["history"]
    )
    size_bytes = sum(p.stat().st_size for p in out.iterdir() if p.name != "README.md")
    card = f"""# krasis-tiny

The bundled default model of krasis: a {facts['params_m']:.2f}M-parameter DeepSeek-V2-architecture
Mixture-of-Experts (MLA attention, a dense first layer, then MoE layers with
{facts['shared']} shared and {facts['experts']} routed experts, top-{facts['top_k']}), trained from
scratch on the English documentation that CPython ships: the `pydoc_data.topics` help topics and
the standard library's docstrings (Python {facts['python']}). It has its own byte-level BPE
tokenizer ({facts['vocab']} tokens) and a chat template. It writes Python-documentation-flavoured
English; it is a smoke-test model, not an assistant.

- Held-out perplexity: **{facts['heldout_ppl']:.2f}** (per token, bf16 weights as stored, over
  {facts['heldout_tokens']} tokens of {facts['heldout_docs']} held-out documents; held out = the
  first 4 bytes of the SHA-256 of a document's text, mod 100, below {facts['heldout_percent']}).
- Training tokens: {facts['train_tokens']} per epoch; {facts['steps_done']} of {facts['steps']}
  scheduled steps of {facts['tokens_per_step']} tokens; {facts['train_minutes']:.1f} minutes on
  {facts['threads']} CPU thread(s) of a shared machine.
- Files: {size_bytes} bytes on disk (weights in bf16).

Greedy continuation (20 tokens, transformers, the stored weights) of the start of a held-out
sentence, `{facts['prompt']}`:

```text
{facts['continuation']}
```

## Training command

```
{facts['command']}
```

| step | train loss | held-out ppl | elapsed s |
| --- | --- | --- | --- |
{rows}
"""
    (out / "README.md").write_text(card)


def prepare_data(args: argparse.Namespace):
    """Split the corpus, train the tokenizer, and encode both parts: (tok, train, held-out)."""
    docs = topic_documents() + docstring_documents()
    train_docs = [d for d in docs if not is_held_out(d[1], args.heldout_percent)]
    heldout_docs = [d for d in docs if is_held_out(d[1], args.heldout_percent)]
    check_sample_prompt(heldout_docs)
    tok = train_tokenizer([text for _, text in train_docs], args.vocab_size)
    train_tokens = token_stream(tok, train_docs, with_chat=True)  # [N]
    heldout_tokens = token_stream(tok, heldout_docs, with_chat=False)  # [M]
    log.info("docs train=%d heldout=%d tokens train=%d heldout=%d", len(train_docs),
             len(heldout_docs), len(train_tokens), len(heldout_tokens))
    return tok, train_tokens, heldout_tokens, len(heldout_docs)


def publish(model, tok: Tokenizer, heldout_tokens: torch.Tensor, args, facts: dict) -> float:
    """Save, reload, evaluate and describe the model in a side folder, then swap it into --out."""
    from transformers import AutoModelForCausalLM

    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, tok, partial)
    saved = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32)
    facts["heldout_ppl"] = evaluate(saved, heldout_tokens, args.seq_len)
    facts["continuation"] = greedy_sample(partial, SAMPLE_PROMPT)
    write_model_card(partial, facts)
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)
    return facts["heldout_ppl"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import DeepseekV2ForCausalLM

    tok, train_tokens, heldout_tokens, heldout_docs = prepare_data(args)
    model = DeepseekV2ForCausalLM(build_config(args, tok)).float().train()
    params = sum(p.numel() for p in model.parameters())
    log.info("parameters=%d", params)
    started = time.monotonic()
    facts = {
        "params_m": params / 1e6, "shared": 1, "experts": args.experts, "top_k": 2,
        "python": sys.version.split()[0], "vocab": tok.get_vocab_size(),
        "heldout_tokens": len(heldout_tokens), "heldout_docs": heldout_docs,
        "heldout_percent": args.heldout_percent, "train_tokens": len(train_tokens),
        "steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len,
        "threads": args.threads, "prompt": SAMPLE_PROMPT,
        "command": "python3 scripts/train_tiny.py " + " ".join(argv or sys.argv[1:]),
    }

    def checkpoint(step: int, history: list[dict]) -> None:
        facts.update(steps_done=step, history=list(history),
                     train_minutes=(time.monotonic() - started) / 60)
        publish(model, tok, heldout_tokens, args, facts)
        log.info("published step %d to %s", step, args.out)

    history = train(model, train_tokens, heldout_tokens, args, on_checkpoint=checkpoint)
    facts.update(steps_done=args.steps, history=history,
                 train_minutes=(time.monotonic() - started) / 60)
    heldout_ppl = publish(model, tok, heldout_tokens, args, facts)
    log.info("saved %s heldout_ppl=%.2f", args.out, heldout_ppl)
    return 0


def check_sample_prompt(heldout_docs: list[tuple[str, str]]) -> None:
    """Refuse to train when SAMPLE_PROMPT does not come from a held-out document."""
    if not any(SAMPLE_PROMPT in " ".join(text.split()) for _, text in heldout_docs):
        raise ValueError(f"the sample prompt is not in a held-out document: {SAMPLE_PROMPT!r}")


if __name__ == "__main__":
    sys.exit(main())
