"""A fake engine that writes tool calls, loaded in real runner processes
(KRASIS_RUNNER_LOADER=tool_engine:load), for the daemon's tool-call tests.

Its chat template writes Hermes' ``<tool_call>`` (so the runner reads Hermes calls) and its
``chat_prompt`` lists the tools it was given. When the prompt lists tools, the answer is
``ANSWER_WITH_TOOLS`` (some text, then two calls); otherwise ``ANSWER_WITHOUT_TOOLS``. The
text comes a few characters per chunk, so markers arrive split across chunks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from krasisd.engine.options import GenerationChunk, SamplingOptions

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "UTC"})]
ANSWER_WITH_TOOLS = "Let me check.\n" + "\n".join(
    f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in CALLS)
ANSWER_WITHOUT_TOOLS = "No tools were offered."
# with thinking on: the model thinks between <think> tags; with a reasoning effort the prompt
# itself ends with <think> (as DeepSeek-R1's template does), so the answer starts inside it
THOUGHT, REPLY = "I should check the weather.", "It is sunny."
CHUNK_CHARS = 3


class TemplateTokenizer:
    chat_template = "{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}"
    chat_templates = {"default": chat_template}
    eos_token_ids = {1}
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [b + 2 for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


class ToolEngine:
    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tokenizer = TemplateTokenizer()
        self.eos_token_ids = {1}

    def chat_prompt(self, messages, add_generation_prompt=True, tools=None,
                    enable_thinking=None, reasoning_effort=None, **template_vars):
        names = ",".join(t["function"]["name"] for t in tools or ())
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        thinking = "" if enable_thinking is None else f"<thinking={enable_thinking}>"
        opened = "<think>" if reasoning_effort else ""
        return f"<tools>{names}</tools>{thinking}{turns}<assistant>{opened}"

    def generate(self, prompt_ids, options: SamplingOptions, should_cancel=None):
        prompt = self.tokenizer.decode(prompt_ids)
        answer = ANSWER_WITHOUT_TOOLS if "<tools></tools>" in prompt else ANSWER_WITH_TOOLS
        if prompt.endswith("<think>"):
            answer = f"{THOUGHT}</think>{REPLY}"
        elif "<thinking=True>" in prompt:
            answer = f"<think>{THOUGHT}</think>{REPLY}"
        elif "<thinking=False>" in prompt:
            answer = REPLY
        started_ns = time.perf_counter_ns()
        pieces = [answer[i:i + CHUNK_CHARS] for i in range(0, len(answer), CHUNK_CHARS)]
        for i, piece in enumerate(pieces):
            yield GenerationChunk(token_id=2 + i % 250, text=piece, logprob=-0.5)
        yield GenerationChunk(token_id=None, text="", done=True, done_reason="stop",
                              prompt_eval_count=len(prompt_ids), prompt_eval_duration_ns=1000,
                              eval_count=len(pieces),
                              eval_duration_ns=time.perf_counter_ns() - started_ns)

    def close(self):
        pass


def load(model_dir, quant="none", device="cpu", threads=None, cache_dir=None, dtype=None):
    return ToolEngine(Path(model_dir))
