"""A fake engine for daemon tests, loaded in real runner processes (KRASIS_RUNNER_LOADER).

It answers fast and predictably: the first chunk echoes the last 80 characters of its prompt
(so tests see what the daemon sent), then words "w1 w2 ..." until num_predict (8 when -1).
``KRASIS_FAKE_DELAY_S`` sets the time per token. A prompt containing "FAIL" raises after
two tokens; a model folder containing a file ``broken`` fails to load. When it notices a
cancellation it writes the file ``cancelled`` into the model folder. It is not a krasis
Engine, so a runner advances its streams one chunk per step on its engine thread
(krasisd.runner_streams).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from krasisd.engine.errors import ModelLoadError
from krasisd.engine.options import GenerationChunk, SamplingOptions


class ByteTokenizer:
    """Bytes + 2 (0 = BOS, 1 = EOS); FakeEngine.chat_prompt renders its template."""

    chat_template = "<role>content ... <assistant>"
    bos_token_id = 0
    eos_token_ids = {1}
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [b + 2 for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


class FakeEngine:
    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tokenizer = ByteTokenizer()
        self.eos_token_ids = {1}
        self.delay_s = float(os.environ.get("KRASIS_FAKE_DELAY_S", "0.001"))

    def chat_prompt(self, messages, add_generation_prompt=True, **template_vars) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def generate(self, prompt_ids, options: SamplingOptions, should_cancel=None):
        should_cancel = should_cancel or (lambda: False)
        prompt = self.tokenizer.decode(prompt_ids)
        count = options.num_predict if options.num_predict >= 0 else 8
        started_ns = time.perf_counter_ns()
        for i in range(count):
            if should_cancel():
                (self.model_dir / "cancelled").write_text(str(i))
                yield self._final("cancel", i, len(prompt_ids), started_ns)
                return
            if i == 2 and "FAIL" in prompt:
                raise RuntimeError("the fake engine failed on purpose")
            time.sleep(self.delay_s)
            text = f"[{prompt[-80:]}]" if i == 0 else f"w{i} "
            yield GenerationChunk(token_id=2 + i % 250, text=text, logprob=-0.25)
        yield self._final("length", count, len(prompt_ids), started_ns)

    def _final(self, reason, count, prompt_count, started_ns) -> GenerationChunk:
        return GenerationChunk(token_id=None, text="", done=True, done_reason=reason,
                               prompt_eval_count=prompt_count, prompt_eval_duration_ns=1000,
                               eval_count=count,
                               eval_duration_ns=time.perf_counter_ns() - started_ns)

    def close(self):
        pass


def load(model_dir, quant="none", device="cpu", threads=None, cache_dir=None, dtype=None):
    model_dir = Path(model_dir)
    if (model_dir / "broken").exists():
        raise ModelLoadError(f"{model_dir.name}: the weights are broken (fake)")
    return FakeEngine(model_dir)
