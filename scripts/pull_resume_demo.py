#!/usr/bin/env python3
"""Demonstrate a pull killed with SIGKILL mid-file, then resumed from the bytes on disk.

Runs the stand-in Hugging Face hub of the test suite on 127.0.0.1, serving a small random
DeepSeek-V2 model whose weights are one ~33 MB safetensors file, throttled so the kill lands
mid-file. A child process pulls it and is killed with SIGKILL; this process then opens the
registry and pulls again. Prints the bytes the server sent before the kill, the bytes on
disk, the bytes the resumed pull fetched, and the file size.

    python3 scripts/pull_resume_demo.py [--kill-after-s 1.5] [--vocab 65536]
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "registry"
sys.path[:0] = [str(ROOT), str(TESTS)]

REPO_ID = "demo-org/tiny-moe"
WEIGHTS = "model.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after-s", type=float, default=1.5)
    parser.add_argument("--vocab", type=int, default=65536, help="sets the weights' size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="log: %(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="krasis-resume-demo-"))
    os.environ.update({"KRASIS_HOME": str(work / "home"), "HF_HUB_OFFLINE": "0",
                       "HF_HOME": str(work / "hf-home")})
    os.environ.pop("HF_TOKEN", None)

    from fakehub import FakeHub, Repo
    from tinymodel import repo_files, write_tiny_model

    model_dir = write_tiny_model(work / "source", vocab_size=args.vocab, max_shard_size="1GB")
    files = repo_files(model_dir, decoys=False)
    size_bytes = len(files[WEIGHTS])
    with FakeHub() as hub:
        repo = Repo()
        repo.add_commit(files)
        hub.repos[REPO_ID] = repo
        os.environ["HF_ENDPOINT"] = hub.url
        hub.chunk_delay_s = 0.01  # 64 KiB per 10 ms: about 6 MB/s
        sent_before, on_disk = _pull_and_kill(work, args.kill_after_s, hub)
        hub.chunk_delay_s = 0.0
        resumed_range, fetched_on_resume, state, error = _resume(hub)
    print(f"weights file                 : {WEIGHTS}, {size_bytes:,} bytes")
    print(f"server sent before kill -9   : {sent_before:,} bytes")
    print(f"partial file on disk         : {on_disk:,} bytes")
    print(f"registry state after restart : {state} ({error})")
    print(f"resume request Range header  : {resumed_range}")
    print(f"fetched on resume            : {fetched_on_resume:,} bytes")
    print(f"on disk + fetched on resume  : {on_disk + fetched_on_resume:,} bytes "
          f"({'equals' if on_disk + fetched_on_resume == size_bytes else 'DIFFERS FROM'} "
          "the file size)")
    print(f"fetched again                : {sent_before + fetched_on_resume - size_bytes:,} bytes"
          " (sent before the kill but not yet on disk)")
    return 0 if on_disk + fetched_on_resume == size_bytes else 1


def _pull_and_kill(work: Path, kill_after_s: float, hub) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    child = subprocess.Popen([sys.executable, "-c", "import registry_child; registry_child.main()", "pull",
                              REPO_ID], env=env, stdout=subprocess.DEVNULL)
    part = (work / "home" / "partials" / "demo-org" / "tiny-moe" / "latest" /
            f"{WEIGHTS}.part")
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > 0):
        if time.monotonic() > deadline or child.poll() is not None:
            raise SystemExit("the pull did not start")
        time.sleep(0.01)
    time.sleep(kill_after_s)
    child.send_signal(signal.SIGKILL)
    child.wait()
    time.sleep(0.2)  # let the server notice the closed connection
    return hub.served(WEIGHTS), part.stat().st_size


def _resume(hub) -> tuple[str, int, str, str]:
    from krasis_registry import Registry

    before = hub.served(WEIGHTS)
    reg = Registry()
    shown = reg.show(REPO_ID)
    for _event in reg.pull(REPO_ID, build_caches=False):
        pass
    resumed = hub.requests_for(WEIGHTS)[-1]["range"]
    assert reg.show(REPO_ID)["state"] == "ready"
    return resumed, hub.served(WEIGHTS) - before, shown["state"], shown["error"]


if __name__ == "__main__":
    sys.exit(main())
