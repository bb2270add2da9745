"""llama.cpp as the benches' peer: the same random checkpoint converted to GGUF and quantized to
Q4_0, then timed with llama-bench (bench/serve.py) or llama-cpp-python (bench/c1_llamacpp.py).

A llama.cpp folder (``--llama-cpp DIR``) is a checkout with its binaries built
(``cmake -B build -DGGML_CUDA=ON && cmake --build build -j``): ``convert_hf_to_gguf.py`` and
``gguf-py/`` at its top, ``llama-bench`` and ``llama-quantize`` in ``build/bin`` (or ``bin``,
or the top). The converter does not know the benches' home-made tokenizers, so the
pre-tokenizer check is bypassed, and the checkpoint is converted from a folder of links to its
weights beside a small byte-level BPE tokenizer (llama.cpp needs BPE merges; llama-bench never
reads text, so the tokenizer does not change its timings). llama.cpp tells DeepSeek-V2-Lite
(no q_lora_rank) from DeepSeek-V2 by its 27 layers: the Lite shapes cut to fewer layers, and
krasis-tiny, fail in llama-quantize ("key not found in model: deepseek2.attention.q_lora_rank").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BINARY_DIRS = ("build/bin", "bin", ".")


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp checkout."""

    src: Path
    bench: Path
    quantize: Path


def find_llama_cpp(folder: Path) -> LlamaCpp:
    """The converter and binaries of a llama.cpp folder; ValueError says what is missing."""
    folder = Path(folder).expanduser()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise ValueError(f"{folder} has no convert_hf_to_gguf.py (not a llama.cpp checkout)")
    found = {}
    for name in ("llama-bench", "llama-quantize"):
        paths = [folder / sub / name for sub in BINARY_DIRS if (folder / sub / name).is_file()]
        if not paths:
            raise ValueError(f"no {name} in {folder}/{{{','.join(BINARY_DIRS)}}}: build llama.cpp "
                             "first (cmake -B build -DGGML_CUDA=ON && cmake --build build -j)")
        found[name] = paths[0]
    return LlamaCpp(folder, found["llama-bench"], found["llama-quantize"])


def write_bpe_tokenizer(model_dir: Path) -> None:
    """A small byte-level BPE tokenizer (600 tokens, ``<bos>``=0, ``<eos>``=1) that the GGUF
    converter accepts; it pads the vocabulary to the config's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>"
                            ).save_pretrained(model_dir)


def conversion_folder(model_dir: Path, work: Path) -> Path:
    """``work/convert``: links to the checkpoint's weights and config, and the BPE tokenizer."""
    folder = work / "convert"
    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.suffix == ".safetensors" or path.name in ("config.json",
                                                          "model.safetensors.index.json"):
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    if not (folder / "tokenizer.json").is_file():
        write_bpe_tokenizer(folder)
    return folder


def convert_to_gguf(model_dir: Path, llama_src: Path, out: Path, outtype: str = "bf16") -> None:
    """convert_hf_to_gguf.py with the BPE pre-tokenizer check bypassed (home-made tokenizer).
    Newer checkouts keep the model classes in a ``conversion`` package, older ones in the
    script itself; the check is replaced in whichever is there."""
    code = (
        "import sys; sys.path[:0] = [{src!r}, {src!r} + '/gguf-py']\n"
        "try:\n"
        "    import conversion.base as base\n"
        "except ImportError:\n"
        "    import convert_hf_to_gguf as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'deepseek-llm'\n"
        "import convert_hf_to_gguf as c\n"
        "sys.argv = ['convert', {model!r}, '--outfile', {out!r}, '--outtype', {outtype!r}]\n"
        "c.main()\n"
    ).format(src=str(llama_src), model=str(model_dir), out=str(out), outtype=outtype)
    run_tool([sys.executable, "-c", code], "convert_hf_to_gguf.py")


def run_tool(argv: list[str], name: str, timeout_s: float = 3600) -> str:
    """Run one llama.cpp program; its stdout, or RuntimeError with the end of its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"{name} exited with {done.returncode}: " + " / ".join(lines[-3:]))
    return done.stdout


def quantize_q4_0(src: Path, dst: Path, threads: int) -> None:
    """Q4_0 through llama-cpp-python's binding (bench/c1_llamacpp.py has no binaries)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")


def q4_0_gguf(tools: LlamaCpp, model_dir: Path, work: Path, log=print) -> Path:
    """``work/model-q4_0.gguf`` of the checkpoint in ``model_dir`` (kept between runs): converted
    to a bf16 GGUF, quantized by llama-quantize, the bf16 GGUF then removed (it is as large as
    the checkpoint)."""
    q4 = work / "model-q4_0.gguf"
    if q4.is_file():
        return q4
    bf16 = work / "model-bf16.gguf"
    if not bf16.is_file():
        log(f"llama.cpp: converting {model_dir} to {bf16}")
        convert_to_gguf(conversion_folder(model_dir, work), tools.src, bf16)
    log(f"llama.cpp: quantizing to {q4}")
    part = q4.with_suffix(".part")
    run_tool([str(tools.quantize), str(bf16), str(part), "Q4_0"], "llama-quantize")
    part.rename(q4)
    bf16.unlink()
    shutil.rmtree(work / "convert", ignore_errors=True)
    return q4


# llama-bench's placements, named by their flags: every layer on the GPU, then the routed
# experts kept on the CPU with large batches (a build without a GPU runs both on the CPU)
PLACEMENTS = {" ".join(flags): flags for flags in (
    ["-ngl", "99"],
    ["-ngl", "99", "-ot", "exps=CPU", "-b", "8192", "-ub", "8192"],
)}


def llama_bench(tools: LlamaCpp, gguf: Path, placement: list[str], *, prompts=(), gens=(),
                depths=(0,), runs: int = 3, timeout_s: float = 3600) -> dict:
    """llama-bench's tok/s: {("pp", n_prompt, depth) or ("tg", n_gen, depth): avg_ts}."""
    argv = [str(tools.bench), "-m", str(gguf), *placement, "-r", str(runs), "-o", "json",
            "-p", ",".join(map(str, prompts)) or "0", "-n", ",".join(map(str, gens)) or "0",
            "-d", ",".join(map(str, depths))]
    return parse_bench_json(run_tool(argv, "llama-bench", timeout_s))


def parse_bench_json(text: str) -> dict:
    """llama-bench ``-o json`` rows as {("pp"|"tg", tokens, depth): avg_ts}; rows with neither
    a prompt nor a generation (``-p 0 -n 0``) are skipped."""
    out = {}
    for row in json.loads(text):
        depth = int(row.get("n_depth", 0))
        if row.get("n_prompt") and not row.get("n_gen"):
            out[("pp", int(row["n_prompt"]), depth)] = float(row["avg_ts"])
        elif row.get("n_gen") and not row.get("n_prompt"):
            out[("tg", int(row["n_gen"]), depth)] = float(row["avg_ts"])
    return out
