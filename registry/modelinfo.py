"""What the registry records about a model folder: architecture, parameter counts, digest.

describe() is also the last check before a model becomes ready: config.json's sizes within
krasisd.engine.limits, and every safetensors file whole (each tensor's bytes inside the
file, at the size its dtype and shape say, the data section exactly covered), so a
truncated or corrupt weights file fails the pull or create instead of every load.
"""

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

from krasisd.engine.limits import (
    ModelLimitError,
    check_config_limits,
    machine_capacity_bytes,
    prequantized_error,
)

from .errors import PullError

# a routed expert's own tensor (experts.3.w1.weight, experts.3.gate_proj.weight), or one of
# all the routed experts fused along a leading [E] dimension (gpt-oss experts.gate_up_proj,
# experts.down_proj_bias); shared_experts.* are not routed
_ROUTED_EXPERT = re.compile(r"\.experts\.(\d+\.|[A-Za-z_]\w*$)")
EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_experts", "num_local_experts")
PER_TOKEN_FIELDS = ("num_experts_per_tok", "experts_per_token")
_HEADER_LIMIT_BYTES = 100 << 20
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8}


def read_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PullError(f"cannot read config.json of {model_dir.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise PullError(f"config.json of {model_dir.name} is not a JSON object")
    return config


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length, then JSON),
    after checking that the header describes the file's data exactly."""
    def corrupt(why: str) -> PullError:
        return PullError(f"{path.name} is not a valid safetensors file: {why}")

    with open(path, "rb") as handle:
        file_bytes = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its header length")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(_HEADER_LIMIT_BYTES, file_bytes - 8):
            raise corrupt(f"a header of {header_bytes:,} bytes in a file of {file_bytes:,}")
        try:
            header = json.loads(handle.read(header_bytes))
        except (UnicodeDecodeError, ValueError) as exc:
            raise corrupt(f"its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_bytes = file_bytes - 8 - header_bytes
    shapes, covered = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, end = _check_tensor(name, entry, data_bytes, corrupt)
        shapes[name] = shape
        covered = max(covered, end)
    if covered != data_bytes:
        raise corrupt(f"its tensors cover {covered:,} of its {data_bytes:,} data bytes "
                      "(truncated, or bytes appended)")
    return shapes


def _check_tensor(name: str, entry, data_bytes: int, corrupt) -> tuple[list[int], int]:
    """(shape, end offset) of one header entry, checked against the data section."""
    if not isinstance(entry, dict):
        raise corrupt(f"tensor {name!r} has no description")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise corrupt(f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"tensor {name!r} has bad data offsets {offsets!r}")
    if offsets[1] > data_bytes:
        raise corrupt(f"tensor {name!r} ends at data byte {offsets[1]:,}, past the file's "
                      f"{data_bytes:,} (truncated?)")
    item_bytes = DTYPE_BYTES.get(dtype)
    if item_bytes is not None and offsets[1] - offsets[0] != math.prod(shape) * item_bytes:
        raise corrupt(f"tensor {name!r} ({dtype} {shape}) should take "
                      f"{math.prod(shape) * item_bytes:,} bytes, not {offsets[1] - offsets[0]:,}")
    return shape, offsets[1]


def parameter_counts(model_dir: Path, config: dict) -> tuple[int, int]:
    """(total, active per token): routed experts' tensors (one per expert, or fused [E, ...])
    count k/E of their weights as active."""
    total = routed = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, shape in _tensor_shapes(path).items():
            count = 1
            for dim in shape:
                count *= dim
            total += count
            if _ROUTED_EXPERT.search(name):
                routed += count
    experts, per_token = routing(config)
    active = total - routed + (routed * per_token // experts if experts else routed)
    return total, active


def routing(config: dict) -> tuple[int, int]:
    """(routed experts, experts per token) from config.json, whichever spelling the family
    uses (DeepSeek n_routed_experts, Qwen3 num_experts, Mixtral / MiniMax-M2 / gpt-oss
    num_local_experts), also under a multimodal config's text_config; 0 when absent."""
    def first(where: dict, names: tuple[str, ...]) -> int:
        for name in names:
            value = where.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    for where in (config, config.get("text_config")):
        if isinstance(where, dict) and first(where, EXPERT_COUNT_FIELDS):
            return first(where, EXPERT_COUNT_FIELDS), first(where, PER_TOKEN_FIELDS)
    return 0, 0


def check_servable(config: dict, source: str, capacity_bytes: int | None) -> None:
    """PullError unless the engine can serve this config.json: its sizes within
    krasisd.engine.limits (the parameter count they imply, at INT4, against
    ``capacity_bytes``), an architecture the engine has, parsed by the engine's own parser
    (krasisd.engine.config, which does not import torch), and no quantization_config."""
    from krasisd.engine.config import ModelConfig
    from krasisd.engine.errors import KrasisEngineError

    quantized = prequantized_error(config)
    if quantized is not None:
        raise PullError(f"refusing {source}: {quantized}")
    try:
        ModelConfig.from_dict(config, capacity_bytes=capacity_bytes)
    except (ValueError, TypeError, KrasisEngineError) as exc:  # sizes, an unknown family
        raise PullError(f"refusing {source}: {exc}") from exc
    except Exception as exc:  # the parser's own failure on an odd value: still a refusal
        raise PullError(f"refusing {source}: the engine cannot parse its config.json "
                        f"({type(exc).__name__}: {exc})") from exc


def describe(model_dir: Path) -> dict:
    """Architecture, model type, dtype and parameter counts of a model folder; PullError for
    sizes beyond krasisd.engine.limits or a corrupt safetensors file."""
    config = read_config(model_dir)
    try:
        check_config_limits(config, machine_capacity_bytes(model_dir))
    except ModelLimitError as exc:
        raise PullError(f"refusing {model_dir.name}: {exc}") from exc
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
