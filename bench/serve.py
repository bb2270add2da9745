"""The headline benchmark, through krasisd as users run it: a daemon of its own with a fresh
KRASIS_HOME, a model registered with ``krasis create`` (random bf16 weights in the real shapes
of a config, so its caches are built as a download's would be), and streamed requests over the
Unix socket. Per scenario (settings passed to the daemon, e.g. KRASIS_VRAM_BUDGET): first token
and prefill rate by prompt length, decode rate and inter-token latency by context, concurrent
streams, a long prompt arriving while streams decode, the first request with an empty kernel
tuning folder, runner memory and VRAM. With ``--llama-cpp DIR`` llama.cpp runs the same weights
(Q4_0, llama-bench, all on the GPU and with its experts on the CPU) in the same run, and its
figures are printed beside krasis'. Markdown tables, printed and written to --out.

    PYTHONPATH=. python3 bench/serve.py --out serve.md                 # DeepSeek-V2-Lite shapes
    PYTHONPATH=. python3 bench/serve.py --model qwen3-30b-a3b --llama-cpp ~/llama.cpp
    python3 bench/serve.py --model krasis-tiny --prompts 64,256 --contexts 64 --streams 1,2 \\
        --runs 2                                                        # CPU, about a minute

--model is krasis-tiny (the bundled model, no folder written), a config of bench/configs
(deepseek-v2-lite, qwen3-30b-a3b) or a config.json path. The synthetic folder and the GGUF are
kept in --work between runs (a temporary folder without it); the daemon's home is always new.
Measurement definitions: bench/serve_measure.py. A full-size model needs disk for its bf16
checkpoint (31 GB for DeepSeek-V2-Lite), its two caches and, with llama.cpp, a bf16 GGUF of the
same size while converting (removed once quantized); Qwen3-30B-A3B's checkpoint is 61 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import serve_measure as measure
from bench_cli import log, positive_int, positive_ints
from served import REPO, LocalDaemon, progress, session

TINY = "krasis-tiny"
TRITON_CACHE = "triton-cache"  # in the daemon's home: compiled kernels start empty too
DEFAULT_SCENARIOS = {"deepseek-v2-lite": ["S1:KRASIS_VRAM_BUDGET=16GiB",
                                          "S2:KRASIS_VRAM_BUDGET=4GiB"],
                     "qwen3-30b-a3b": ["S3:KRASIS_VRAM_BUDGET=8GiB"]}


@dataclass(frozen=True)
class Scenario:
    """A daemon configuration: a name and the settings passed to it."""

    name: str
    env: dict = field(default_factory=dict)


def parse_scenario(text: str) -> Scenario:
    """``NAME`` or ``NAME:KRASIS_VAR=value[,KRASIS_VAR=value]``."""
    name, _, settings = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"scenario {text!r}: use NAME[:KRASIS_VAR=value,...]")
    env = {}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, equals, value = item.partition("=")
        if not (equals and key.startswith("KRASIS_")):
            raise argparse.ArgumentTypeError(
                f"scenario {text!r}: {item!r} is not KRASIS_VAR=value (docs/settings.md)")
        env[key] = value
    return Scenario(name.strip(), env)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v2-lite",
                        help="krasis-tiny, a config of bench/configs, or a config.json path")
    parser.add_argument("--layers", type=positive_int,
                        help="keep only the first N layers of the config (quicker runs)")
    parser.add_argument("--prompts", type=positive_ints, default=[1000, 10000, 32000],
                        help="prompt lengths in tokens for first token and prefill")
    parser.add_argument("--contexts", type=positive_ints, default=[100, 1000, 10000, 32000],
                        help="contexts in tokens at which decode is timed")
    parser.add_argument("--decode", type=positive_int, default=128,
                        help="tokens generated per decode request")
    parser.add_argument("--streams", type=positive_ints, default=[1, 4, 8, 16],
                        help="concurrent streams (at the first context)")
    parser.add_argument("--busy", type=positive_int, default=4,
                        help="streams decoding while the longest prompt arrives")
    parser.add_argument("--runs", type=positive_int, default=3, help="medians of this many")
    parser.add_argument("--scenario", dest="scenarios", type=parse_scenario, action="append",
                        help="NAME[:KRASIS_VAR=value,...], repeatable (default: S1/S2 for "
                             "deepseek-v2-lite and S3 for qwen3-30b-a3b on a GPU, else one "
                             "scenario with default settings)")
    parser.add_argument("--llama-cpp", type=Path,
                        help="a built llama.cpp checkout: run it on the same weights")
    parser.add_argument("--work", type=Path, help="keeps the synthetic folder and the GGUF")
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model == TINY and args.layers:
        parser.error("--layers cuts a config's synthetic model; krasis-tiny is served whole")
    if args.model != TINY:
        from synthetic_folder import read_bench_config

        try:
            args.config = read_bench_config(args.model)
        except (ValueError, OSError) as exc:
            parser.error(f"--model: {exc}")
    if args.llama_cpp is not None:
        from llamacpp import find_llama_cpp

        try:
            args.tools = find_llama_cpp(args.llama_cpp)
        except ValueError as exc:
            parser.error(f"--llama-cpp: {exc}")
    return args


def daemon_env(args, scenario: Scenario) -> dict:
    """The scenario's settings; KRASIS_NUM_PARALLEL, unless it sets it, large enough for the
    most streams and for the long prompt to start beside the busy ones (with the default 4,
    a fifth request waits in the queue instead)."""
    parallel = str(max(max(args.streams), args.busy + 1))
    return {"KRASIS_NUM_PARALLEL": parallel, **scenario.env}


def default_scenarios(model: str, has_gpu: bool) -> list[Scenario]:
    if has_gpu and model in DEFAULT_SCENARIOS:
        return [parse_scenario(s) for s in DEFAULT_SCENARIOS[model]]
    return [Scenario("default")]


# -- the model ------------------------------------------------------------------------------

def model_folder(args, work: Path) -> tuple[str, Path | None, Path]:
    """(name to serve, folder to create it from or None for a pull, tokenizer folder)."""
    if args.model == TINY:
        from krasis_registry.create import bundled_dir

        return TINY, None, bundled_dir(TINY)
    from synthetic_folder import write_model

    config = dict(args.config)
    if args.layers:
        config["num_hidden_layers"] = min(args.layers, config["num_hidden_layers"])
    stem = Path(args.model).parent.name if args.model.endswith(".json") else args.model
    name = f"bench-{stem}-{config['num_hidden_layers']}l".lower()
    folder = work / name
    started = time.perf_counter()
    write_model(folder, config, seed=args.seed)
    log(f"synthetic folder {folder} ready in {time.perf_counter() - started:.1f} s")
    return name, folder, folder


async def register(args, scenario: Scenario, home: Path, name: str,
                   folder: Path | None) -> float:
    """``krasis create`` (or the bundled model's pull) through a daemon with the first
    scenario's settings; seconds it took, caches included."""
    daemon = LocalDaemon(home, daemon_env(args, scenario)).start()
    try:
        async with session(daemon.socket) as http:
            started = time.perf_counter()
            if folder is None:
                await progress(http, "/api/pull", {"model": name}, log=log)
            else:
                await progress(http, "/api/create", {"model": name, "path": str(folder)},
                               log=log)
            return time.perf_counter() - started
    except BaseException:
        log(f"registering {name} failed; the daemon's log ends with:\n{daemon.log_tail(40)}")
        raise
    finally:
        daemon.stop()


# -- one scenario ---------------------------------------------------------------------------

async def run_scenario(args, scenario: Scenario, home: Path, name: str,
                       tokenizer_dir: Path) -> dict:
    from synthetic_folder import PromptMaker

    for folder_name in ("tuning", TRITON_CACHE):  # every scenario starts as on a new machine
        shutil.rmtree(home / folder_name, ignore_errors=True)
    out: dict = {"scenario": scenario}
    env = {"TRITON_CACHE_DIR": str(home / TRITON_CACHE), **daemon_env(args, scenario)}
    daemon = LocalDaemon(home, env).start()
    try:
        async with session(daemon.socket) as http:
            target = measure.Target(name, PromptMaker(tokenizer_dir), seed=args.seed)
            short = min(args.prompts)
            log(f"[{scenario.name}] first request")
            out["cold"] = await measure.first_request(http, target, short)
            out["tuning_files"] = sorted(p.name for p in (home / "tuning").glob("*"))
            await measure.unload(http, name)
            out["restart"] = await measure.first_request(http, target, short)
            out["prefill"] = {}
            for n in args.prompts:
                log(f"[{scenario.name}] prefill {n}")
                out["prefill"][n] = await measure.prefill(http, target, n, args.runs)
            out["decode"] = {}
            for ctx in args.contexts:
                log(f"[{scenario.name}] decode at {ctx}")
                out["decode"][ctx] = await measure.decode(http, target, ctx, args.decode,
                                                          args.runs)
            out["streams"] = {}
            for n in args.streams:
                log(f"[{scenario.name}] {n} streams")
                out["streams"][n] = await measure.streams(http, target, n, min(args.contexts),
                                                          args.decode, args.runs)
            log(f"[{scenario.name}] {max(args.prompts)}-token prompt under {args.busy} streams")
            out["long"] = await measure.long_prompt_under_load(
                http, target, args.busy, min(args.contexts), max(args.prompts), args.runs)
            out["memory"] = await measure.memory(http, name, daemon.pid)
    except BaseException:
        log(f"[{scenario.name}] failed; the daemon's log ends with:\n{daemon.log_tail(40)}")
        raise
    finally:
        daemon.stop()
    return out


# -- llama.cpp ------------------------------------------------------------------------------

def run_llama(args, folder: Path | None, tokenizer_dir: Path, work: Path) -> dict:
    """{placement: {key: tok/s}} or {"not_run": reason}."""
    if args.llama_cpp is None:
        return {"not_run": "no --llama-cpp DIR given"}
    from llamacpp import PLACEMENTS, llama_bench, q4_0_gguf

    try:
        gguf = q4_0_gguf(args.tools, folder or tokenizer_dir, work, log=log)
        out = {}
        for placement, flags in PLACEMENTS.items():
            log(f"llama.cpp: llama-bench, {placement}")
            pp = llama_bench(args.tools, gguf, flags, prompts=args.prompts, runs=args.runs)
            tg = llama_bench(args.tools, gguf, flags, gens=[args.decode], depths=args.contexts,
                             runs=args.runs)
            out[placement] = {**pp, **tg}
        return out
    except (subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
        return {"not_run": f"llama.cpp failed: {exc}"}


# -- markdown -------------------------------------------------------------------------------

def fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}"


def gib(value) -> str:
    return "–" if value is None else f"{value / (1 << 30):.2f} GiB"


def ratio(ours, theirs_text: str) -> str:
    try:
        theirs = float(theirs_text.replace(",", ""))
    except ValueError:
        return "–"
    return f"{ours / theirs:.2f}" if ours and theirs else "–"


def scenario_markdown(args, result: dict, llama: dict) -> list[str]:
    s = result["scenario"]
    settings = ", ".join(f"{k}={v}" for k, v in daemon_env(args, s).items())
    lines = [f"### {s.name} ({settings})", ""]
    not_run = llama.get("not_run")
    from llamacpp import PLACEMENTS

    head = " | ".join(f"llama.cpp Q4_0 `{flags}` | ratio" for flags in PLACEMENTS)
    lines += [f"| prompt tokens | first token ms | prefill tok/s | {head} |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, row in result["prefill"].items():
        peers = _peers(llama, ("pp", n, 0))
        counted = row["prompt_tokens"]
        tokens = f"{n:,}" if counted == n else f"{n:,} (the runner counted {counted})"
        lines.append(f"| {tokens} | {fmt(row['ttft_s'], 1e3, 0)} | {fmt(row['prefill_tok_s'])} | "
                     + " | ".join(_with_ratios(row["prefill_tok_s"], peers)) + " |")
    lines += ["", "| context | tokens | first token ms | decode tok/s | runner tok/s | "
              f"ITL p50 ms | ITL p99 ms | {head} |", "| ---: |" + " ---: |" * 10]
    for ctx, row in result["decode"].items():
        peers = _peers(llama, ("tg", args.decode, ctx))
        lines.append(f"| {ctx:,} | {fmt(row['tokens'], digits=0)} | "
                     f"{fmt(row['ttft_s'], 1e3, 0)} | {fmt(row['tok_s'])} | "
                     f"{fmt(row['runner_tok_s'])} | "
                     f"{fmt(row['itl_p50_s'], 1e3, 2)} | {fmt(row['itl_p99_s'], 1e3, 2)} | "
                     + " | ".join(_with_ratios(row["tok_s"], peers)) + " |")
    if not_run:
        lines += ["", f"llama.cpp: not run ({not_run})."]
    lines += ["", f"Concurrent streams at context {min(args.contexts):,}, {args.decode} tokens "
              "each (llama-bench has no concurrent streams: no peer):", "",
              "| streams | total tok/s | tok/s per stream | ITL p50 ms | ITL p99 ms |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for n, row in result["streams"].items():
        lines.append(f"| {n} | {fmt(row['total_tok_s'])} | {fmt(row['stream_tok_s'])} | "
                     f"{fmt(row['itl_p50_s'], 1e3, 2)} | {fmt(row['itl_p99_s'], 1e3, 2)} |")
    long, alone = result["long"], result["prefill"][max(args.prompts)]
    lines += ["", f"A {max(args.prompts):,}-token prompt arriving while {args.busy} streams "
              "decode:", "",
              "| its first token ms (alone) | its first token ms (under load) | "
              "streams' ITL p99 ms before | ITL p99 ms during | longest gap ms during |",
              "| ---: | ---: | ---: | ---: | ---: |",
              f"| {fmt(alone['ttft_s'], 1e3, 0)} | {fmt(long['long_ttft_s'], 1e3, 0)} | "
              f"{fmt(long['itl_p99_before_s'], 1e3, 2)} | "
              f"{fmt(long['itl_p99_during_s'], 1e3, 2)} | "
              f"{fmt(long['max_gap_during_s'], 1e3, 0)} |"]
    mem, cold, restart = result["memory"], result["cold"], result["restart"]
    tuning = ", ".join(result["tuning_files"]) or "none written (no GPU kernels to tune)"
    lines += ["", "| first request, empty tuning folder and Triton cache: first token ms "
              "(load ms) | after a runner restart, both kept | runner RSS | runner peak RSS | VRAM "
              "(/api/ps) | daemon RSS |", "| ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| {fmt(cold['ttft_s'], 1e3, 0)} ({fmt(cold['load_s'], 1e3, 0)}) | "
              f"{fmt(restart['ttft_s'], 1e3, 0)} ({fmt(restart['load_s'], 1e3, 0)}) | "
              f"{gib(mem.get('runner_rss_bytes'))} | {gib(mem.get('runner_peak_bytes'))} | "
              f"{gib(mem.get('vram_bytes'))} | {gib(mem.get('daemon_rss_bytes'))} |",
              "", f"Tuning files after the first request: {tuning}.", ""]
    return lines


def _peers(llama: dict, key) -> list[str]:
    if "not_run" in llama:
        return ["not run", "not run"]
    from llamacpp import PLACEMENTS

    return [fmt(llama[p][key]) if key in llama[p] else "not run (no such row)"
            for p in PLACEMENTS]


def _with_ratios(ours, peers: list[str]) -> list[str]:
    return [cell for peer in peers for cell in (peer, ratio(ours, peer))]


def machine() -> dict:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno"],
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": f"{cpu} ({os.cpu_count()} cores)", "gpu": gpu,
            "commit": commit + (" (with uncommitted changes)" if dirty else "")}


def report(args, info: dict, name: str, register_s: float, results: list[dict],
           llama: dict) -> str:
    how = "`krasis pull`, the bundled model" if args.model == TINY else "`krasis create`"
    lines = [f"## krasisd serving {name} ({args.model}"
             + (f", the first {min(args.layers, args.config['num_hidden_layers'])} of its "
                f"{args.config['num_hidden_layers']} layers" if args.layers else "") + ")", "",
             f"Commit {info['commit']}; GPU: {info['gpu']}; CPU: {info['cpu']}; "
             f"Python {platform.python_version()}.", "",
             "```sh", "python3 bench/serve.py " + shlex.join(sys.argv[1:]), "```", "",
             f"Medians of {args.runs} run{'s' if args.runs > 1 else ''}; raw prompts, greedy, "
             "streamed over the Unix socket; "
             f"times by the client's clock. Registering the model ({how}, caches included) "
             f"took {register_s:.1f} s. Decode: {args.decode} tokens asked "
             "per request (`tokens`: the token lines received, fewer when the model ended its "
             "answer); definitions in bench/serve_measure.py.", ""]
    for result in results:
        if "failed" in result:
            lines += [f"### {result['scenario'].name}", "",
                      f"Not run to the end: {result['failed']}", ""]
        else:
            lines += scenario_markdown(args, result, llama)
    return "\n".join(lines)


async def main_async(args) -> str:
    work = args.work or Path(tempfile.mkdtemp(prefix="krasis-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    try:
        info = machine()
        scenarios = args.scenarios or default_scenarios(args.model, info["gpu"] != "none")
        name, folder, tokenizer_dir = model_folder(args, work)
        register_s = await register(args, scenarios[0], home, name, folder)
        results = []
        for scenario in scenarios:
            try:
                results.append(await run_scenario(args, scenario, home, name, tokenizer_dir))
            except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:  # the next may run
                log(f"[{scenario.name}] failed: {exc}")
                results.append({"scenario": scenario, "failed": str(exc)})
        shutil.rmtree(home, ignore_errors=True)  # the caches: before a GGUF needs the disk
        llama = run_llama(args, folder, tokenizer_dir, work)
        return report(args, info, name, register_s, results, llama)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        text = asyncio.run(main_async(args))
    except OSError as exc:  # no room for the checkpoint, a folder that cannot be written
        print(f"serve.py: {exc}", file=sys.stderr)
        return 1
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
        log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
