"""What the registry records about a model folder: architecture, parameter counts, digest."""

import hashlib
import json
import re
import struct
from pathlib import Path

from .errors import PullError

_ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")
_HEADER_LIMIT_BYTES = 100 << 20


def read_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PullError(f"cannot read config.json of {model_dir.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise PullError(f"config.json of {model_dir.name} is not a JSON object")
    return config


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        if header_bytes > _HEADER_LIMIT_BYTES:
            raise PullError(f"{path.name} is not a safetensors file (header too large)")
        header = json.loads(handle.read(header_bytes))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def parameter_counts(model_dir: Path, config: dict) -> tuple[int, int]:
    """(total, active per token): routed experts count k/E of their weights as active."""
    total = routed = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, shape in _tensor_shapes(path).items():
            count = 1
            for dim in shape:
                count *= dim
            total += count
            if _ROUTED_EXPERT.search(name):
                routed += count
    experts = config.get("n_routed_experts") or config.get("num_experts") or 0
    per_token = config.get("num_experts_per_tok") or 0
    active = total - routed + (routed * per_token // experts if experts else routed)
    return total, active


def describe(model_dir: Path) -> dict:
    """Architecture, model type, dtype and parameter counts of a model folder."""
    config = read_config(model_dir)
    total, active = parameter_counts(model_dir, config)
    architectures = config.get("architectures") or []
    return {
        "config": config,
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "dtype": config.get("torch_dtype") or config.get("dtype"),
        "params_total": total,
        "params_active": active,
    }


def manifest_digest(files: list[tuple[str, str]]) -> str:
    """sha256 over sorted `path sha256` lines: one digest naming the whole model."""
    lines = "".join(f"{path} {sha}\n" for path, sha in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def human_count(count: int | None) -> str:
    """Ollama-style parameter size: 15.7B, 236M, 12K."""
    if not count:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
