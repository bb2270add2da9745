"""Constants and helpers shared by the registry tests (kept out of conftest.py, whose module
name every test folder shares)."""

import os
from pathlib import Path

REPO_ID = "krasis-test/tiny-moe"
HERE = Path(__file__).parent
REPO_ROOT = HERE.parent.parent


def subprocess_env() -> dict[str, str]:
    """The test's environment for a child process, with the project and these helpers importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return env
