"""krasisd: the krasis daemon (Ollama- and OpenAI-compatible API over a Unix socket)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("krasis")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
