"""Which files of a model are taken: safetensors weights, json, tokenizer and template files.

Only top-level files: sub-folders of Hub repos hold other formats (onnx/, original/, gguf).
Python files are never taken, so nothing is executed from a pulled repo, and pickle
weights (.bin, .pt, .pth, .ckpt) are never loaded: a repo that has only those is refused.
"""

from .errors import PullError

TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
     "spiece.model", "sentencepiece.bpe.model"}
)
TAKEN_SUFFIXES = (".safetensors", ".json", ".jinja", ".tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_taken(path: str) -> bool:
    """True for the files krasis needs from a model repo or folder."""
    if "/" in path or path.startswith("."):
        return False
    return path in TOKENIZER_FILES or path.endswith(TAKEN_SUFFIXES)


def select(paths: list[str], source: str, name_files: bool = True) -> list[str]:
    """The taken paths, sorted; refuse folders without config.json or safetensors weights.

    name_files=False: the errors do not name the files found (a folder the caller may not
    be able to list)."""
    taken = sorted(p for p in paths if is_taken(p))
    if not any(p.endswith(".safetensors") for p in taken):
        pickles = sorted(p for p in paths if p.endswith(PICKLE_SUFFIXES))
        if pickles:
            found = f" ({', '.join(pickles[:3])})" if name_files else ""
            raise PullError(
                f"{source} has only pickle weights{found}; krasis loads "
                "safetensors only, since pickle files can run code when loaded. Use a repo "
                "that ships .safetensors, or convert the weights first"
            )
        raise PullError(f"{source} has no .safetensors weights")
    if "config.json" not in taken:
        raise PullError(f"{source} has no config.json")
    return taken
