"""Model names (`name[:tag]`), aliases of well-known models, and safe paths inside the store."""

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InvalidName

DEFAULT_TAG = "latest"
BUNDLED = frozenset({"krasis-tiny"})
ALIASES = {
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "deepseek-v2-lite-base": "deepseek-ai/DeepSeek-V2-Lite",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "glm-4.5-air": "zai-org/GLM-4.5-Air",
    "glm-4.6": "zai-org/GLM-4.6",
    # these releases are FP8 or MXFP4: the engine refuses them, naming the format, until it
    # reads those formats (docs/registry.md)
    "minimax-m2": "MiniMaxAI/MiniMax-M2",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "gpt-oss-20b": "openai/gpt-oss-20b",
}
# Bare names live under this namespace folder; "_" can never start a user's component.
BARE_NAMESPACE = "_"

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_FILE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


@dataclass(frozen=True)
class ModelRef:
    """A validated model name: `name` (one or two components) and `tag`."""

    name: str
    tag: str = DEFAULT_TAG

    @property
    def full(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str]:
        """Three path components (namespace, name, tag), the same depth for every model."""
        if "/" in self.name:
            namespace, name = self.name.split("/")
            return namespace, name, self.tag
        return BARE_NAMESPACE, self.name, self.tag

    @property
    def hub_repo(self) -> str | None:
        """The Hugging Face repo this name pulls from, or None (bundled or local only)."""
        if self.name in ALIASES:
            return ALIASES[self.name]
        if "/" in self.name:
            return self.name
        return None

    @property
    def is_bundled(self) -> bool:
        return self.name in BUNDLED


def _check_component(text: str, original: str) -> None:
    if text in ("", ".", "..") or not _COMPONENT.fullmatch(text):
        raise InvalidName(
            f"invalid model name {original!r}: each part must start with a letter or digit and "
            "use only letters, digits, '.', '_' and '-' (for example 'qwen3-30b-a3b' or "
            "'org/repo:tag')"
        )


def parse_name(text: str) -> ModelRef:
    """Parse and validate `name[:tag]` or `org/repo[:tag]`; refuse what could escape the store."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidName("a model name is required")
    original = text
    text = text.strip()
    name, sep, tag = text.partition(":")
    if sep and not _TAG.fullmatch(tag):
        raise InvalidName(
            f"invalid tag in {original!r}: use letters, digits, '.', '_' and '-' after ':'"
        )
    components = name.split("/")
    if len(components) > 2:
        raise InvalidName(f"invalid model name {original!r}: use 'name' or 'org/repo'")
    for component in components:
        _check_component(component, original)
    return ModelRef(name=name, tag=tag if sep else DEFAULT_TAG)


def safe_file_path(path: str) -> PurePosixPath:
    """Validate a file path inside a model (from a hub listing or a local folder)."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or "\x00" in path or pure.is_absolute():
        raise InvalidName(f"refusing file path {path!r}: absolute or malformed")
    for part in pure.parts:
        if part in (".", "..") or not _FILE_COMPONENT.fullmatch(part):
            raise InvalidName(f"refusing file path {path!r}: it could escape the model folder")
    return pure
