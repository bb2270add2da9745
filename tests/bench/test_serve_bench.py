"""bench/serve.py and bench/soak.py: their command lines, the statistics and parsing they rest
on, the synthetic folder they register, and one small run of each against a real krasisd on
the CPU (krasis-tiny)."""

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import their neighbours
    return lambda name: importlib.import_module(name)


def test_percentile_is_nearest_rank(bench):
    measure = bench("serve_measure")
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert measure.percentile(values, 0.5) == 50
    assert measure.percentile(values, 0.99) == 99
    assert measure.percentile(values, 1.0) == 100
    assert measure.percentile([7.5], 0.99) == 7.5
    assert measure.percentile([1, 2, 3, 1000], 0.99) == 1000  # one outlier in few is the p99
    assert measure.percentile([], 0.5) is None
    with pytest.raises(ValueError):
        measure.percentile([1], 0)


def test_median_skips_missing(bench):
    measure = bench("serve_measure")
    assert measure.median([3, None, 1, 2]) == 2
    assert measure.median([None]) is None


def test_stream_result_times(bench):
    served = bench("served")
    result = served.StreamResult(status=200, sent_s=10.0, token_times_s=[10.5, 10.6, 10.8, 11.0],
                                 final={"prompt_eval_count": 100,
                                        "prompt_eval_duration": 250_000_000})
    assert result.ok
    assert result.ttft_s == pytest.approx(0.5)
    assert result.gaps_s == pytest.approx([0.1, 0.2, 0.2])
    assert result.decode_tok_s() == pytest.approx(3 / 0.75)  # from the prefill's end at 10.25
    assert result.prefill_tok_s() == pytest.approx(400.0)
    burst = served.StreamResult(status=200, sent_s=10.0, token_times_s=[11.0] * 4,
                                final=result.final)  # every line held back to the end
    assert burst.decode_tok_s() == pytest.approx(3 / 0.75)
    cut = served.StreamResult(status=200, sent_s=10.0, token_times_s=[10.5, 10.6, 10.8],
                              cut=True)
    assert cut.ok and cut.decode_tok_s() == pytest.approx(2 / 0.3)
    assert not served.StreamResult(status=200, error="runner died").ok


def test_serve_defaults(bench):
    serve = bench("serve")
    args = serve.parse_args([])
    assert args.model == "deepseek-v2-lite"
    assert (args.prompts, args.contexts, args.streams) == (
        [1000, 10000, 32000], [100, 1000, 10000, 32000], [1, 4, 8, 16])
    assert serve.daemon_env(args, serve.Scenario("x")) == {"KRASIS_NUM_PARALLEL": "16"}
    assert [s.name for s in serve.default_scenarios("deepseek-v2-lite", True)] == ["S1", "S2"]
    assert serve.default_scenarios("deepseek-v2-lite", False) == [serve.Scenario("default")]


def test_scenarios_carry_settings(bench):
    serve = bench("serve")
    args = serve.parse_args(["--scenario", "S2:KRASIS_VRAM_BUDGET=4GiB, KRASIS_NUM_PARALLEL=2",
                             "--scenario", "plain"])
    assert args.scenarios == [
        serve.Scenario("S2", {"KRASIS_VRAM_BUDGET": "4GiB", "KRASIS_NUM_PARALLEL": "2"}),
        serve.Scenario("plain")]
    assert serve.daemon_env(args, args.scenarios[0])["KRASIS_NUM_PARALLEL"] == "2"


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "S1:VRAM=4GiB"], "not KRASIS_VAR=value"),
    (["--scenario", ":KRASIS_X=1"], "NAME[:KRASIS_VAR=value"),
    (["--prompts", "1000,x"], "not an integer"),
    (["--runs", "0"], "at least 1"),
    (["--llama-cpp", "/nonexistent/llama.cpp"], "no convert_hf_to_gguf.py"),
    (["--model", "llama-70b"], "no config 'llama-70b'"),
    (["--model", "krasis-tiny", "--layers", "2"], "served whole"),
])
def test_serve_bad_flags_are_usage_errors(bench, capsys, argv, message):
    serve = bench("serve")
    with pytest.raises(SystemExit) as exit_info:
        serve.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_llama_cpp_without_binaries_is_named(bench, tmp_path):
    llamacpp = bench("llamacpp")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    with pytest.raises(ValueError, match="no llama-bench"):
        llamacpp.find_llama_cpp(tmp_path)
    for name in ("llama-bench", "llama-quantize"):
        (tmp_path / "build" / "bin").mkdir(parents=True, exist_ok=True)
        (tmp_path / "build" / "bin" / name).write_text("")
    assert llamacpp.find_llama_cpp(tmp_path).bench == tmp_path / "build" / "bin" / "llama-bench"


def test_llama_bench_json_rows(bench):
    llamacpp = bench("llamacpp")
    rows = [{"n_prompt": 1000, "n_gen": 0, "n_depth": 0, "avg_ts": 5000.5},
            {"n_prompt": 0, "n_gen": 128, "n_depth": 1000, "avg_ts": 90.25},
            {"n_prompt": 0, "n_gen": 128, "avg_ts": 99.0},  # older builds: no n_depth
            {"n_prompt": 512, "n_gen": 128, "n_depth": 0, "avg_ts": 1.0}]  # -pg: not ours
    assert llamacpp.parse_bench_json(json.dumps(rows)) == {
        ("pp", 1000, 0): 5000.5, ("tg", 128, 1000): 90.25, ("tg", 128, 0): 99.0}


def test_synthetic_folder_loads_and_prompts_are_exact(bench, tmp_path):
    synthetic = bench("synthetic_folder")
    from krasisd.engine.gpu.synthetic import TINY_QWEN3_MOE
    from krasisd.engine.loader import load_model

    config = dict(TINY_QWEN3_MOE, vocab_size=300, bos_token_id=0)
    folder = synthetic.write_model(tmp_path / "model", config)
    loaded = load_model(folder)
    assert loaded.config.vocab_size == 300 and loaded.expert_weights  # the loader's checks pass
    maker = synthetic.PromptMaker(folder)
    assert len(maker.words) == 299  # every id but the BOS is a word
    assert "eos_token_id" not in json.loads((folder / "config.json").read_text())
    for n_tokens in (2, 17, 600):
        assert maker.count(maker.prompt(n_tokens, seed=n_tokens)) == n_tokens
    assert maker.tokenizer.decode([5, 6]) == "w5 w6"  # each sampled id streams as text


def test_prompts_of_the_bundled_tokenizer_are_exact(bench):
    synthetic = bench("synthetic_folder")
    from krasis_registry.create import bundled_dir

    maker = synthetic.PromptMaker(bundled_dir("krasis-tiny"))
    assert maker.count(maker.prompt(64, seed=1)) == 64
    assert maker.prompt(64, seed=1) != maker.prompt(64, seed=2)


def test_soak_flags_and_requests(bench, capsys):
    import random

    soak = bench("soak")
    args = soak.parse_args([])
    assert (args.seconds, args.model, args.pull) == (60, "krasis-tiny", True)
    assert not soak.parse_args(["--socket", "/tmp/x.sock"]).pull
    with pytest.raises(SystemExit):
        soak.parse_args(["--kill-every", "-1"])
    assert "--kill-every" in capsys.readouterr().err
    rng = random.Random(0)
    for kind in soak.KINDS:
        method, path, body = soak.request_for(kind, "m", rng)
        assert method in ("GET", "POST") and path.startswith(("/api/", "/v1/"))
        if kind in ("bad-json", "not-object"):  # str bodies that are no JSON object
            with pytest.raises((json.JSONDecodeError, AttributeError)):
                json.loads(body).keys()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_small_run_on_the_cpu(bench, tmp_path, capsys):
    """The whole bench against a real daemon on krasis-tiny, at the smallest settings."""
    serve = bench("serve")
    out = tmp_path / "serve.md"
    assert serve.main(["--model", "krasis-tiny", "--prompts", "16,48", "--contexts", "16",
                       "--streams", "2", "--busy", "1", "--decode", "8", "--runs", "1",
                       "--scenario", "plain", "--scenario",
                       "broken:KRASIS_RUNNER_LOADER=no_such_module:load", "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    peer_tables = text.split("llama.cpp: not run", 1)[0]  # the prefill and decode tables
    prefill_rows = [line for line in peer_tables.splitlines()
                    if line.startswith(("| 16 |", "| 48 |"))]
    assert len(prefill_rows) == 3  # two prompt lengths and one decode context
    assert all("not run" in row for row in prefill_rows)  # no llama.cpp given, said so
    assert "| – |" not in prefill_rows[0].split("not run")[0]  # every krasis figure measured
    assert "llama.cpp: not run (no --llama-cpp DIR given)" in text
    assert "### plain (KRASIS_NUM_PARALLEL=2)" in text
    broken = text.split("### broken", 1)[1]  # a scenario that fails is said so; others stand
    assert "Not run to the end: first request: HTTP 500" in broken
    assert "no_such_module" in broken


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_soak_short_run(bench, capsys):
    soak = bench("soak")
    status = soak.main(["--seconds", "3", "--clients", "2", "--kill-every", "1.5"])
    out = capsys.readouterr().out
    assert "1 runner kills" in out and "| bad-json |" in out
    assert "after the soak a normal request completed" in out
    assert status == (1 if "unexpected (" in out else 0)


def test_synthetic_folder_says_when_the_disk_is_too_small(bench, tmp_path, monkeypatch):
    synthetic = bench("synthetic_folder")
    config = synthetic.read_bench_config("deepseek-v2-lite")
    assert 31e9 < synthetic.checkpoint_bytes(config) < 32e9  # 15.7B parameters in bf16
    usage = synthetic.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(synthetic.shutil, "disk_usage",
                        lambda path: usage._replace(free=10 << 30))
    with pytest.raises(OSError, match="needs 31.4 GB, 10.7 GB are free"):
        synthetic.write_model(tmp_path / "model", config)
    assert not list((tmp_path / "model").glob("*.safetensors"))
