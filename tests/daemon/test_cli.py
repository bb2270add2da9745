"""The krasis CLI against a fake daemon: one-shot commands, errors, pull progress, run."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import test_cli_fakedaemon as fakes
from krasis import cli
from krasis import client as client_module
from krasis.client import Client


@pytest.fixture
def daemon(monkeypatch):
    yield from fakes.running_daemon(monkeypatch)


def run_cli(monkeypatch, capsys, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """Run `krasis argv...` in this process with stdin not a terminal."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- no daemon, errors -------------------------------------------------------------------------

def test_no_daemon_prints_one_line_with_how_to_start(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("KRASIS_SOCKET", str(tmp_path / "absent.sock"))
    code, out, err = run_cli(monkeypatch, capsys, "list")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("Error: could not connect to krasisd at ")
    assert "krasis serve" in err and "systemctl --user start krasisd" in err


def test_no_daemon_console_script_has_no_traceback(tmp_path):
    env = {**os.environ, "KRASIS_SOCKET": str(tmp_path / "absent.sock")}
    env.pop("KRASIS_HOST", None)
    result = subprocess.run([sys.executable, "-m", "krasis.cli", "ps"], env=env, timeout=60,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_system_socket_gets_the_system_start_hint(monkeypatch, capsys):
    monkeypatch.setenv("KRASIS_SOCKET", "/run/krasis/does-not-exist.sock")
    code, _, err = run_cli(monkeypatch, capsys, "ps")
    assert code == 1
    assert "sudo systemctl start krasisd" in err


def test_api_error_is_one_line(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "FAIL please")
    assert code == 1
    assert err == "Error: invalid options: top_p must be in (0, 1]\n"


def test_error_in_mid_stream_is_one_line_after_the_text(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "MIDSTREAM now")
    assert code == 1
    assert out.startswith("echo: MIDSTREAM now")
    assert err.strip().splitlines()[-1] == "Error: runner died"


# -- models ------------------------------------------------------------------------------------

def test_list_prints_a_table(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "list")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    tiny = next(line for line in lines if line.startswith("krasis-tiny:latest"))
    assert "ab12ab12ab12" in tiny and "2.0 MB" in tiny and "2 days ago" in tiny


def test_ps_shows_size_processor_split_and_until(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "ps")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CACHE", "UNTIL"]
    tiny = next(line for line in lines if line.startswith("krasis-tiny"))
    big = next(line for line in lines if line.startswith("big"))
    assert "100 MB" in tiny and "100% CPU" in tiny and "4 minutes from now" in tiny
    assert "48%/52% CPU/GPU" in big and "Forever" in big
    assert "12 MB, 83% hit" in big and " - " in tiny  # the prefix cache, where one is kept


def test_show_prints_model_parameters_and_license(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "show", "krasis-tiny")
    assert code == 0
    assert "architecture" in out and "deepseek2" in out
    assert "2.1M" in out and "8 (2 active)" in out and "4096" in out
    assert 'stop' in out and '"<|end|>"' in out
    assert "MIT License" in out and "more" not in out  # the license is cut to two lines
    assert "krasis/tiny" in out and "0123456789ab" in out and "0123456789abc" not in out
    cpu = next(line for line in out.splitlines() if "cpu int4 g128" in line)
    assert "1.5 MB" in cpu and "ready" in cpu
    assert "failed: no GPU" in out
    code, out, _ = run_cli(monkeypatch, capsys, "show", "krasis-tiny", "--template")
    assert out == "{{ .Prompt }}\n"


def test_show_unknown_model(daemon, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "show", "nope")
    assert code == 1
    assert err == "Error: model 'nope' not found\n"


def test_rm_deletes_each_model(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "rm", "krasis-tiny:latest", "slow")
    assert code == 0
    assert out.splitlines() == ["deleted 'krasis-tiny:latest'", "deleted 'slow'"]
    assert daemon.models == {}
    code, _, err = run_cli(monkeypatch, capsys, "rm", "krasis-tiny")
    assert code == 1 and "not found" in err


def test_stop_unloads_with_keep_alive_zero(daemon, monkeypatch, capsys):
    code, _, _ = run_cli(monkeypatch, capsys, "stop", "krasis-tiny")
    assert code == 0
    assert daemon.bodies("/api/generate")[-1] == {
        "model": "krasis-tiny", "keep_alive": 0, "stream": False}
    code, _, err = run_cli(monkeypatch, capsys, "stop", "slow")
    assert code == 1
    assert "not loaded" in err
    assert len(daemon.bodies("/api/generate")) == 1


def test_version_reports_daemon_and_client(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "version")
    assert code == 0
    assert "krasisd version is 9.9.9" in out
    assert f"client version is {cli.client_version()}" in out


# -- pull and create ---------------------------------------------------------------------------

def test_pull_progress_without_a_terminal(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "pull", "fresh")
    assert code == 0
    assert err.splitlines() == [
        "pulling manifest",
        "pulling model.safetensors: 100% 2.0 MB",
        "pulling tokenizer.json: 100% 3.0 KB",
        "building cpu cache: 100% 4/4",
        "verifying sha256 digest",
        "success",
    ]
    assert daemon.bodies("/api/pull") == [{"model": "fresh", "insecure": False, "stream": True}]


def test_pull_error_in_the_stream(daemon, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "pull", "broken")
    assert code == 1
    assert err.splitlines()[-1] == "Error: download failed: connection reset"
    assert "success" not in err


def test_create_sends_the_absolute_folder(daemon, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "create", "mine", "--from", "weights")
    assert code == 0
    assert err.splitlines()[-1] == "success"
    assert daemon.bodies("/api/create")[0]["path"] == str(folder.resolve())
    assert "mine:latest" in daemon.models


def test_create_from_a_missing_folder_sends_nothing(daemon, monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "create", "mine", "--from", str(tmp_path / "x"))
    assert code == 1
    assert err.startswith("Error: --from ") and "no such directory" in err
    assert daemon.bodies("/api/create") == []


# -- run, one-shot -----------------------------------------------------------------------------

def test_run_with_a_prompt_streams_the_answer(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "hello", "there")
    assert code == 0
    assert out == "echo: hello there\n"
    body = daemon.bodies("/api/generate")[0]
    assert body == {"model": "krasis-tiny", "prompt": "hello there", "stream": True}


def test_run_reads_piped_stdin_before_the_prompt(daemon, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "summarize",
                           stdin="some text")
    assert code == 0
    assert daemon.bodies("/api/generate")[0]["prompt"] == "some text summarize"
    assert out == "echo: some text summarize\n"


def test_run_verbose_prints_rates(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "hi", "--verbose")
    assert code == 0
    stats = dict(line.split(":", 1) for line in err.strip().splitlines())
    assert stats["eval count"].strip() == "10 token(s)"
    assert stats["eval rate"].strip() == "20.00 tokens/s"  # 10 tokens in 0.5 s
    assert stats["prompt eval rate"].strip() == "2000.00 tokens/s"  # 8 tokens in 4 ms
    assert stats["total duration"].strip() == "2s"


@pytest.mark.parametrize("argv", [
    ["krasis-tiny", "--verbose", "hi", "there"],
    ["--verbose", "krasis-tiny", "hi", "there"],
    ["krasis-tiny", "hi", "there", "--verbose"],
    ["krasis-tiny", "hi", "--verbose", "there"],
])
def test_run_takes_options_anywhere_on_the_line(daemon, monkeypatch, capsys, argv):
    code, out, err = run_cli(monkeypatch, capsys, "run", *argv)
    assert code == 0, err
    assert daemon.bodies("/api/generate")[0]["prompt"] == "hi there"
    assert out == "echo: hi there\n" and "eval rate:" in err


def test_run_after_double_dash_everything_is_prompt(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "--system", "s", "--",
                             "-n", "--verbose")
    assert code == 0
    body = daemon.bodies("/api/generate")[0]
    assert body["prompt"] == "-n --verbose" and body["system"] == "s"
    assert "eval rate" not in err


def test_run_unknown_option_is_a_usage_error(daemon, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(monkeypatch, capsys, "run", "krasis-tiny", "hi", "--bogus")
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert daemon.requests == []


def test_serve_hands_every_argument_to_krasisd(monkeypatch):
    import krasisd.__main__ as daemon_main

    seen = []
    monkeypatch.setattr(daemon_main, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["serve", "--version"]) == 0
    assert cli.main(["serve", "--help"]) == 0
    assert cli.main(["serve"]) == 0
    assert seen == [["--version"], ["--help"], []]


@pytest.mark.parametrize(("flag", "sent"), [("10m", "10m"), ("-1", -1), ("0", 0), ("1.5", 1.5)])
def test_run_keepalive_is_sent(daemon, monkeypatch, capsys, flag, sent):
    code, _, _ = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "x", f"--keepalive={flag}")
    assert code == 0
    assert daemon.bodies("/api/generate")[0]["keep_alive"] == sent


def test_run_bad_keepalive_is_refused_before_any_request(daemon, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "x", "--keepalive=soon")
    assert code == 1
    assert err.startswith("Error: invalid --keepalive 'soon'")
    assert daemon.requests == []


def test_run_format_json_and_system(daemon, monkeypatch, capsys):
    code, _, _ = run_cli(monkeypatch, capsys, "run", "krasis-tiny", "x", "--format", "json",
                         "--system", "be terse")
    assert code == 0
    body = daemon.bodies("/api/generate")[0]
    assert body["format"] == "json" and body["system"] == "be terse"


def test_run_missing_model_without_a_terminal_says_how_to_pull(daemon, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", "newmodel", "hi")
    assert code == 1
    assert "krasis pull newmodel" in err and "--yes" in err
    assert daemon.bodies("/api/pull") == []


def test_run_missing_model_with_yes_pulls_then_answers(daemon, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "newmodel", "hi", "--yes")
    assert code == 0
    assert daemon.bodies("/api/pull")[0]["model"] == "newmodel"
    assert "success" in err
    assert out == "echo: hi\n"


def test_run_missing_model_asks_on_a_terminal(daemon, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code = cli.main(["run", "newmodel", "hi"])
    assert code == 1
    assert "Pull it now? [y/N]" in capsys.readouterr().out
    assert daemon.bodies("/api/pull") == []
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert cli.main(["run", "newmodel", "hi"]) == 0
    assert len(daemon.bodies("/api/pull")) == 1


# -- where the daemon is -----------------------------------------------------------------------

def test_default_socket_is_under_the_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KRASIS_SOCKET", raising=False)
    monkeypatch.delenv("KRASIS_HOST", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert Client().socket_path == str(tmp_path / "run" / "krasis" / "krasisd.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("KRASIS_HOME", str(tmp_path / "home"))
    assert Client().socket_path == str(tmp_path / "home" / "krasisd.sock")


def test_the_system_socket_is_used_when_it_is_the_only_one(monkeypatch, tmp_path):
    monkeypatch.delenv("KRASIS_SOCKET", raising=False)
    monkeypatch.delenv("KRASIS_HOST", raising=False)
    system_socket = tmp_path / "system.sock"
    monkeypatch.setattr(client_module, "SYSTEM_SOCKET", str(system_socket))
    assert Client().socket_path != str(system_socket)
    system_socket.touch()
    assert Client().socket_path == str(system_socket)
    monkeypatch.setenv("KRASIS_SOCKET", str(tmp_path / "mine.sock"))
    assert Client().socket_path == str(tmp_path / "mine.sock")


def test_krasis_host_talks_tcp(daemon, monkeypatch, capsys):
    monkeypatch.delenv("KRASIS_SOCKET")
    monkeypatch.setenv("KRASIS_HOST", f"http://127.0.0.1:{daemon.tcp_port}")
    code, out, _ = run_cli(monkeypatch, capsys, "list")
    assert code == 0 and "krasis-tiny:latest" in out
    monkeypatch.setenv("KRASIS_HOST", "127.0.0.1:1")
    code, _, err = run_cli(monkeypatch, capsys, "list")
    assert code == 1 and "http://127.0.0.1:1" in err


def test_bad_krasis_host_is_one_error_line(monkeypatch, capsys):
    monkeypatch.delenv("KRASIS_SOCKET", raising=False)
    monkeypatch.setenv("KRASIS_HOST", "127.0.0.1:99999")
    code, _, err = run_cli(monkeypatch, capsys, "ps")
    assert code == 1
    assert err.startswith("Error: KRASIS_HOST='127.0.0.1:99999'") and err.count("\n") == 1
