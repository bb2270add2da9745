"""The krasis command against the real krasisd and the bundled krasis-tiny model:
serve, pull, an interactive answer on a terminal, ps, stop, rm."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import pytest
from krasis.client import Client, ConnectError

try:
    from krasis_registry.create import bundled_dir

    BUNDLED = (bundled_dir("krasis-tiny") / "config.json").is_file()
except Exception:  # noqa: BLE001 - any failure here means there is no bundled model to test
    BUNDLED = False

pytestmark = pytest.mark.skipif(not BUNDLED, reason="the bundled krasis-tiny is not built")
START_TIMEOUT_S = 90


def krasis(*argv: str, env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krasis.cli", *argv], env=env, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


@pytest.fixture
def served(tmp_path):
    """A `krasis serve` in a temporary home; yields its environment."""
    folder = Path(tempfile.mkdtemp(prefix="krasis-e2e-"))
    env = {**os.environ, "KRASIS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "KRASIS_SOCKET": str(folder / "krasisd.sock"), "KRASIS_THREADS": "1"}
    for name in ("KRASIS_HOST", "KRASIS_PRELOAD", "NOTIFY_SOCKET"):
        env.pop(name, None)
    log = open(tmp_path / "krasisd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "krasis.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    client = Client(socket_path=env["KRASIS_SOCKET"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.heartbeat()
            break
        except ConnectError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "krasisd.log").read_text()) from None
            time.sleep(0.2)
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_pull_run_ps_stop_rm(served):
    pulled = krasis("pull", "krasis-tiny", env=served)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr.strip().splitlines()[-1] == "success"
    listed = krasis("list", env=served)
    assert "krasis-tiny" in listed.stdout

    child = pexpect.spawn(sys.executable, ["-m", "krasis.cli", "run", "krasis-tiny", "--verbose"],
                          env=served, encoding="utf-8", timeout=180, dimensions=(24, 120))
    child.expect_exact(">>> ")
    child.sendline("/set parameter num_predict 12")
    child.expect_exact("Set parameter 'num_predict' to '12'")
    child.sendline("/set parameter seed 7")
    child.sendline("Tell me about Python modules.")
    child.expect(r"\neval count:\s+(\d+) token\(s\)")
    assert 1 <= int(child.match.group(1)) <= 12
    child.expect(r"eval rate:\s+[\d.]+ tokens/s")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    ps = krasis("ps", env=served)
    row = next(line for line in ps.stdout.splitlines() if line.startswith("krasis-tiny"))
    assert "100% CPU" in row and "from now" in row
    assert krasis("stop", "krasis-tiny", env=served).returncode == 0
    deadline = time.monotonic() + 30
    while "krasis-tiny" in krasis("ps", env=served).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "krasis-tiny" not in krasis("ps", env=served).stdout
    removed = krasis("rm", "krasis-tiny", env=served)
    assert removed.stdout.strip() == "deleted 'krasis-tiny'"
    assert "krasis-tiny" not in krasis("list", env=served).stdout
