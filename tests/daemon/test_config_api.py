"""Settings parsing and the API contract's request parsing (no daemon needed)."""

from __future__ import annotations

import json
import logging
import math

import pytest

from krasisd import api, runner
from krasisd.config import (
    Config,
    gpu_dense_value,
    load_config,
    num_parallel_value,
    parse_duration_s,
    parse_host,
    parse_size_bytes,
)
from krasisd.scheduler import runner_capacity


@pytest.mark.parametrize("value,seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("250ms", 0.25), (120, 120.0),
    ("45", 45.0), (0, 0.0), ("0", 0.0), (-1, math.inf), ("-1m", math.inf), ("-1", math.inf),
])
def test_duration(value, seconds):
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", "m5", True, None, [1]])
def test_bad_duration(value):
    with pytest.raises(ValueError):
        parse_duration_s(value)


def test_sizes_and_hosts():
    assert parse_size_bytes("16GiB") == 16 * 2**30
    assert parse_size_bytes("1.5GB") == 1_500_000_000
    assert parse_size_bytes("512") == 512
    with pytest.raises(ValueError):
        parse_size_bytes("lots")
    assert parse_host("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_host("[::1]:9") == ("::1", 9)
    assert parse_host("localhost") == ("localhost", 11434)  # Ollama's port
    with pytest.raises(ValueError):
        parse_host("localhost:99999")


def test_defaults(tmp_path):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")})
    assert cfg.socket == tmp_path / "run" / "krasis" / "krasisd.sock"
    assert cfg.host == "" and cfg.tcp_address is None
    assert cfg.keep_alive_s == 1800.0 and cfg.max_queue == 512 and cfg.quant == "int4"
    no_runtime = load_config({"KRASIS_HOME": str(tmp_path)})
    assert no_runtime.socket == tmp_path / "krasisd.sock"


def test_env_overrides_file_and_bad_values_fall_back(tmp_path, caplog):
    (tmp_path / "config.toml").write_text(
        'keep_alive = "10m"\nmax_queue = 7\nthreads = 3\npreload = ["a", "b"]\nquant = "int9"\n')
    env = {"KRASIS_HOME": str(tmp_path), "KRASIS_MAX_QUEUE": "9", "KRASIS_MAX_LOADED": "-2"}
    with caplog.at_level(logging.WARNING):
        cfg = load_config(env)
    assert cfg.config_file == tmp_path / "config.toml"
    assert cfg.keep_alive_s == 600.0 and cfg.threads == 3 and cfg.preload == ["a", "b"]
    assert cfg.max_queue == 9  # the environment wins over the file
    assert cfg.max_loaded == 2 and cfg.quant == "int4"  # bad values: defaults
    settings = {r.setting for r in caplog.records if hasattr(r, "setting")}
    assert settings == {"KRASIS_MAX_LOADED", "KRASIS_QUANT"}


@pytest.mark.parametrize("raw,expected,warned", [
    (None, 4, False), ("1", 1, False), ("8", 8, False), (" 2 ", 2, False),
    ("0", 4, True), ("-3", 4, True), ("two", 4, True), ("2.5", 4, True),
])
def test_num_parallel(tmp_path, caplog, raw, expected, warned):
    env = {"KRASIS_HOME": str(tmp_path)}
    if raw is not None:
        env["KRASIS_NUM_PARALLEL"] = raw
    with caplog.at_level(logging.WARNING):
        cfg = load_config(env)
    assert cfg.num_parallel == expected
    settings = {getattr(r, "setting", None) for r in caplog.records}
    assert ("KRASIS_NUM_PARALLEL" in settings) == warned
    assert f"num_parallel={expected}" in " ".join(f"{k}={v}" for k, v in
                                                   cfg.as_log_dict().items())


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "4"])
def test_num_parallel_in_code_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValueError) as caught:
        Config(home=tmp_path, num_parallel=value)
    assert str(caught.value) == _num_parallel_error(value)
    assert "must be a positive integer" in str(caught.value)


def _num_parallel_error(value, text=False) -> str:
    with pytest.raises(ValueError) as caught:
        num_parallel_value(value, text=text)
    return str(caught.value)


@pytest.mark.parametrize("raw", ["0", "-3", "two", "2.5", "4x", "true"])
def test_num_parallel_has_one_check_and_one_message(tmp_path, caplog, capsys, raw):
    """The daemon's setting, the runner's command line and the scheduler's reading of what a
    runner reports refuse a bad value with the same message, none with a traceback."""
    message = _num_parallel_error(raw, text=True)
    assert "KRASIS_NUM_PARALLEL" in message and repr(raw) in message
    with caplog.at_level(logging.WARNING):
        cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_NUM_PARALLEL": raw})
        assert runner_capacity(type("Runner", (), {"num_parallel": raw})()) == 1
    assert cfg.num_parallel == 4
    reasons = [getattr(r, "reason", None) for r in caplog.records]
    assert reasons == [message, message]  # the setting's warning, then the scheduler's
    with pytest.raises(SystemExit):
        runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                            "--num-parallel", raw])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("raw,expected", [(" 3 ", 3), ("1", 1), ("+2", 2)])
def test_num_parallel_text_is_read_alike_everywhere(tmp_path, raw, expected):
    cfg = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_NUM_PARALLEL": raw})
    args = runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                               "--num-parallel", raw])
    assert cfg.num_parallel == args.num_parallel == expected
    assert runner_capacity(type("Runner", (), {"num_parallel": expected})()) == expected


def test_non_loopback_host_needs_opt_in(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        off = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": "0.0.0.0:8000"})
    assert off.host == "" and "KRASIS_ALLOW_REMOTE" in caplog.text
    on = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": "0.0.0.0:8000",
                      "KRASIS_ALLOW_REMOTE": "1"})
    assert on.tcp_address == ("0.0.0.0", 8000)
    local = load_config({"KRASIS_HOME": str(tmp_path), "KRASIS_HOST": "127.0.0.1:8001"})
    assert local.tcp_address == ("127.0.0.1", 8001)


def test_unset_is_not_false():
    unset = api.generate_request({"model": "m", "prompt": "p"})
    off = api.generate_request({"model": "m", "prompt": "p", "stream": False, "keep_alive": 0})
    assert unset.stream is True and unset.keep_alive_s is None
    assert off.stream is False and off.keep_alive_s == 0


def test_options_map_to_sampling_options():
    req = api.generate_request({"model": "m", "prompt": "p", "options": {
        "temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 42, "stop": "END",
        "num_predict": 12, "num_ctx": 256, "repeat_penalty": 1.0, "num_thread": 8}})
    o = req.options
    assert (o.temperature, o.top_k, o.top_p, o.min_p, o.seed) == (0.0, 5, 0.5, 0.1, 42)
    assert (o.stop, o.num_predict, o.num_ctx, o.repeat_penalty) == (["END"], 12, 256, 1.0)
    defaults = api.generate_request({"model": "m", "prompt": "p"}).options
    assert defaults.temperature == 0.8 and defaults.num_predict == -1


def test_openai_requests():
    chat = api.openai_chat_request({
        "model": "m", "messages": [{"role": "developer", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "stop": ["x"], "stream": True,
        "stream_options": {"include_usage": True}, "response_format": {"type": "json_object"}})
    assert chat.inference.messages == [{"role": "system", "content": "ab"}]
    assert chat.inference.options.num_predict == 5 and chat.inference.options.stop == ["x"]
    assert chat.include_usage and chat.inference.format == "json"
    assert chat.inference.options.temperature == 1.0  # OpenAI's default, not Ollama's
    completion = api.openai_completion_request({"model": "m", "prompt": ["p"], "logprobs": 2})
    assert completion.inference.options.num_predict == 16 and completion.top_logprobs == 2
    assert completion.inference.logprobs and completion.inference.raw


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b/c", "a\\\\b", "..", "a:b:c",
                                  "", "x" * 300, "a/..", "~root"])
def test_names_that_could_be_paths_are_refused(name):
    with pytest.raises(api.ApiError) as info:
        api.model_name({"model": name})
    assert info.value.status == 400


@pytest.mark.parametrize("name", ["krasis-tiny", "deepseek-ai/DeepSeek-V2-Lite:main", "m:q4"])
def test_good_names(name):
    assert api.model_name({"model": name}) == name


@pytest.mark.parametrize("hidden,width,wanted,expected", [
    (2048, 1408, "int4", ("int4", "cache-int4")),
    (192, 96, "int4", ("int8", None)),  # no INT4 layout fits; INT8 has no ready cache
    (100, 50, "int4", ("none", None)),
    (2048, 1408, "none", ("none", None)),
])
def test_format_falls_back_when_shapes_do_not_fit(tmp_path, hidden, width, wanted, expected):
    from krasisd.models import ModelCatalog

    class Registry:
        def show(self, name):
            cache = {"format": "cpu", "quant": "int4", "group_size": 64, "state": "ready",
                     "path": str(tmp_path / "cache-int4"), "updated_at": "2026-01-01"}
            return {"name": "m:latest", "path": str(tmp_path), "size": 1, "state": "ready",
                    "error": None, "caches": [cache],
                    "config": {"hidden_size": hidden, "moe_intermediate_size": width}}

    spec = ModelCatalog(Registry(), wanted)._spec("m")
    assert (spec.quant, spec.cache_dir.name if spec.cache_dir else None) == expected


def test_structured_log_formats():
    from krasisd.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("krasisd.x", logging.INFO, __file__, 1, "runner ready", (), None)
    record.model = "krasis-tiny:latest"
    record.load_ms = 12
    record.note = 'two words "quoted"'
    text = TextFormatter().format(record)
    assert 'level=INFO source=krasisd.x msg="runner ready" model=krasis-tiny:latest' in text
    assert 'load_ms=12 note="two words \\"quoted\\""' in text
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["msg"] == "runner ready" and parsed["model"] == "krasis-tiny:latest"
    assert parsed["load_ms"] == 12 and parsed["level"] == "INFO"


@pytest.mark.parametrize("raw,expected,warned", [
    (None, "quant", False), ("quant", "quant", False), ("bf16", "bf16", False),
    (" BF16 ", "bf16", False), ("int4", "quant", True), ("fp16", "quant", True),
])
def test_gpu_dense(tmp_path, caplog, raw, expected, warned):
    env = {"KRASIS_HOME": str(tmp_path)}
    if raw is not None:
        env["KRASIS_GPU_DENSE"] = raw
    with caplog.at_level(logging.WARNING):
        cfg = load_config(env)
    assert cfg.gpu_dense == expected
    warnings = [r for r in caplog.records if getattr(r, "setting", None) == "KRASIS_GPU_DENSE"]
    assert bool(warnings) == warned
    if warned:
        assert warnings[0].reason == _gpu_dense_error(raw)
    assert cfg.as_log_dict()["gpu_dense"] == expected


def test_gpu_dense_from_the_config_file(tmp_path, caplog):
    (tmp_path / "config.toml").write_text('gpu_dense = "bf16"\n')
    assert load_config({"KRASIS_HOME": str(tmp_path)}).gpu_dense == "bf16"
    (tmp_path / "config.toml").write_text("gpu_dense = 16\n")  # not text: the default
    with caplog.at_level(logging.WARNING):
        assert load_config({"KRASIS_HOME": str(tmp_path)}).gpu_dense == "quant"
    assert any(getattr(r, "setting", None) == "KRASIS_GPU_DENSE" for r in caplog.records)


def _gpu_dense_error(value) -> str:
    with pytest.raises(ValueError) as caught:
        gpu_dense_value(value)
    return str(caught.value)


@pytest.mark.parametrize("value", ["int8", "", None, 4])
def test_gpu_dense_has_one_check_and_one_message(tmp_path, capsys, value):
    """Config in code and the runner's command line refuse a bad value with the setting's
    message (the environment's warning is checked above), none with a traceback."""
    message = _gpu_dense_error(value)
    assert "KRASIS_GPU_DENSE" in message and "quant, bf16" in message and repr(value) in message
    with pytest.raises(ValueError) as caught:
        Config(home=tmp_path, gpu_dense=value)
    assert str(caught.value) == message
    if isinstance(value, str):
        with pytest.raises(SystemExit):
            runner._parse_args(["--fd", "3", "--model", "m", "--model-dir", "/m",
                                "--gpu-dense", value])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_the_settings_module_stays_light():
    """The daemon reads KRASIS_GPU_DENSE's values from krasisd.config without loading torch."""
    import subprocess
    import sys

    code = ("import sys, krasisd.config as c; "
            "assert c.GPU_DENSE_WEIGHTS == ('quant', 'bf16'), c.GPU_DENSE_WEIGHTS; "
            "assert 'torch' not in sys.modules, 'krasisd.config loaded torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
