"""Load a Hugging Face model folder: config.json plus memory-mapped safetensors weights.

Everything is checked before anything is assigned (files, headers, tensor names, shapes),
so a load either returns a complete model or raises ModelLoadError. Pickle checkpoints
(.bin, .pt) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from krasisd.engine.config import ModelConfig
from krasisd.engine.errors import ModelLoadError, UnsupportedModelError
from krasisd.engine.limits import prequantized_error
from krasisd.engine.models import build_model
from krasisd.engine.models.common import CausalLM
from krasisd.engine.upload import Span, parse_header, read_to_device

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# kept in their stored dtype: the router, and Gated DeltaNet's decay parameters (float32 in
# Qwen3-Next and Qwen3.5 checkpoints; the model computes the decay in float32)
ROUTER_KEYS = re.compile(r"\.mlp\.gate\.(weight|bias|e_score_correction_bias)$"
                         r"|\.linear_attn\.(A_log|dt_bias)$")
# other families' spellings of the engine's tensor names (the renames transformers applies)
RENAMES = (
    (re.compile(r"^(language_model\.model|model\.language_model)\."), "model."),  # Kimi K2.5
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),  # Mixtral, MiniMax-M2
    (re.compile(r"\.experts\.(\d+)\.w1\.weight$"), r".experts.\1.gate_proj.weight"),
    (re.compile(r"\.experts\.(\d+)\.w3\.weight$"), r".experts.\1.up_proj.weight"),
    (re.compile(r"\.experts\.(\d+)\.w2\.weight$"), r".experts.\1.down_proj.weight"),
    (re.compile(r"\.mlp\.e_score_correction_bias$"), ".mlp.gate.e_score_correction_bias"),
    (re.compile(r"\.mlp\.router\.(weight|bias)$"), r".mlp.gate.\1"),  # gpt-oss
)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
FLOAT_DTYPES = ("F32", "F16", "BF16")
ExpertWeights = dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    span: Span  # where its bytes lie in the file, from the file's header
    key: str = ""  # its name in the file when that differs from the engine's (RENAMES)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.span.shape

    @property
    def dtype(self) -> str:
        """safetensors' name, e.g. "BF16"."""
        return self.span.dtype_name


@dataclass
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    expert_weights: ExpertWeights  # layer -> (gate [E][I, D], up [E][I, D], down [E][D, I])


def read_config(model_dir: Path) -> ModelConfig:
    """Parse config.json, turning every problem into ModelLoadError."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"config.json not found in {model_dir}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    check_not_prequantized(raw)
    try:
        return ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def check_not_prequantized(raw: dict) -> None:
    """Refuse a config.json that declares a ``quantization_config``, naming its format
    (krasisd.engine.limits.prequantized_error): the engine reads float weights only."""
    error = prequantized_error(raw)
    if error is not None:
        raise UnsupportedModelError(error)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights, from the index when there is one."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read {index_path}: {exc}") from exc
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(f"{INDEX_FILE} lists files that are missing: {', '.join(missing)}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}); they are refused "
            "because loading them can run arbitrary code. Convert them to safetensors."
        )
    raise ModelLoadError(f"no *.safetensors weight files in {model_dir}")


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Tensor name -> where and what, from the safetensors headers only (no data read); each
    header is read and parsed once, and the reads straight to a GPU reuse it."""
    index: dict[str, TensorInfo] = {}
    for path in files:
        for key, span in parse_header(path).items():
            name = engine_name(key)
            if name in index:
                shown = key if name == key else f"{key} (read as {name})"
                raise ModelLoadError(f"tensor {shown} appears in {index[name].path.name} "
                                     f"and {path.name}")
            index[name] = TensorInfo(path, span, "" if name == key else key)
    return index


def engine_name(key: str) -> str:
    """The engine's name for a checkpoint tensor name (RENAMES applied in order)."""
    for pattern, replacement in RENAMES:
        key = pattern.sub(replacement, key)
    return key


def expert_names(config: ModelConfig, layer_idx: int, index: dict[str, TensorInfo]):
    """Checkpoint names and expected shapes of a layer's routed experts.

    Real checkpoints store one tensor per expert and projection; a fused layout
    (``experts.gate_up_proj`` [E, 2I, D], ``experts.down_proj`` [E, D, I]) is also accepted.
    These are the (gate, up, down) weights the quantizing cache builders read: experts with
    biases and another activation (gpt-oss) raise UnsupportedModelError (all_expert_names
    lists theirs).
    """
    if config.expert_bias:
        raise UnsupportedModelError(
            f"{config.architecture}'s experts (biases, clamped SwiGLU) are not supported by the "
            "native INT4/INT8 expert kernels or their caches; load it with quant='none'")
    return all_expert_names(config, layer_idx, index)


def all_expert_names(config: ModelConfig, layer_idx: int, index: dict[str, TensorInfo]):
    """expert_names, and for gpt-oss its fused, transposed layout with biases:
    ``gate_up_proj`` [E, D, 2I] (gate and up interleaved), ``gate_up_proj_bias`` [E, 2I],
    ``down_proj`` [E, I, D], ``down_proj_bias`` [E, D]."""
    prefix = f"model.layers.{layer_idx}.mlp.experts"
    hidden, inter, num = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    if config.expert_bias:
        return {f"{prefix}.gate_up_proj": (num, hidden, 2 * inter),
                f"{prefix}.gate_up_proj_bias": (num, 2 * inter),
                f"{prefix}.down_proj": (num, inter, hidden),
                f"{prefix}.down_proj_bias": (num, hidden)}
    if f"{prefix}.gate_up_proj" in index:
        return {f"{prefix}.gate_up_proj": (num, 2 * inter, hidden),
                f"{prefix}.down_proj": (num, hidden, inter)}
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    return {f"{prefix}.{e}.{proj}.weight": shapes[proj]
            for e in range(num) for proj in EXPERT_PROJS}


def plan_tensors(model: CausalLM, config: ModelConfig, index: dict[str, TensorInfo]):
    """Every tensor to read with its expected shape; raises on anything missing or mis-shaped."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" not in index:
        expected.pop("lm_head.weight")
    for layer_idx in range(config.num_hidden_layers):
        if config.is_moe_layer(layer_idx):
            expected.update(all_expert_names(config, layer_idx, index))
    missing = [n for n in expected if n not in index]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise ModelLoadError(f"{len(missing)} tensors missing from the checkpoint: {shown}")
    for name, shape in expected.items():
        if index[name].dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"tensor {name} is stored as {index[name].dtype}; only {', '.join(FLOAT_DTYPES)} "
                "weights are supported"
            )
        if index[name].shape != shape:
            raise ModelLoadError(
                f"tensor {name} has shape {list(index[name].shape)} in {index[name].path.name}, "
                f"the config implies {list(shape)}"
            )
    extra = len(index) - len(expected)
    if extra:
        log.info("ignoring %d checkpoint tensors the model does not use", extra)
    return expected


def read_tensors(names, index: dict[str, TensorInfo],
                 device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors (pages are read on first touch, not copied); on a CUDA ``device``,
    read straight into device memory instead (krasisd.engine.upload)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name].path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        keys = {name: index[name].key or name for name in file_names}  # names in the file
        if device is not None and device.type == "cuda":
            spans = {keys[name]: index[name].span for name in file_names}
            read = read_to_device(path, list(keys.values()), device, spans)
            out.update({name: read[keys[name]] for name in file_names})
            continue
        try:
            with safe_open(path, framework="pt") as handle:
                for name in file_names:
                    out[name] = handle.get_tensor(keys[name])
        except Exception as exc:
            raise ModelLoadError(f"cannot read tensors from {path.name}: {exc}") from exc
    return out


def _split_experts(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype) -> ExpertWeights:
    weights: ExpertWeights = {}
    inter = config.moe_intermediate_size
    for layer_idx in range(config.num_hidden_layers):
        if not config.is_moe_layer(layer_idx):
            continue
        prefix = f"model.layers.{layer_idx}.mlp.experts"
        fused = tensors.pop(f"{prefix}.gate_up_proj", None)
        if config.expert_bias:  # gpt-oss: [E, D, 2I] with gate and up interleaved, biases
            weights[layer_idx] = _gpt_oss_experts(fused.to(dtype), tensors, prefix, dtype)
            continue
        if fused is not None:
            fused, down = fused.to(dtype), tensors.pop(f"{prefix}.down_proj").to(dtype)
            weights[layer_idx] = (list(fused[:, :inter]), list(fused[:, inter:]), list(down))
            continue
        lists = tuple(
            [tensors.pop(f"{prefix}.{e}.{proj}.weight").to(dtype)
             for e in range(config.n_routed_experts)]
            for proj in EXPERT_PROJS
        )
        weights[layer_idx] = lists
    return weights


def _gpt_oss_experts(gate_up: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str,
                     dtype) -> tuple[list[torch.Tensor], ...]:
    """gpt-oss's fused experts as per-expert (gate [I, D], up [I, D], down [D, I], gate bias [I],
    up bias [I], down bias [D]): gate_up [E, D, 2I] holds gate in the even and up in the odd
    columns, down [E, I, D] is transposed."""
    bias = tensors.pop(f"{prefix}.gate_up_proj_bias").to(dtype)  # [E, 2I]
    down = tensors.pop(f"{prefix}.down_proj").to(dtype)  # [E, I, D]
    down_bias = tensors.pop(f"{prefix}.down_proj_bias").to(dtype)  # [E, D]
    gate = gate_up[:, :, 0::2].transpose(1, 2)  # [E, I, D]
    up = gate_up[:, :, 1::2].transpose(1, 2)  # [E, I, D]
    return (list(gate), list(up), list(down.transpose(1, 2)), list(bias[:, 0::2]),
            list(bias[:, 1::2]), list(down_bias))


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None,
               with_experts: bool = True, device: torch.device | None = None,
               skip_linears: Iterable[str] = ()) -> LoadedModel:
    """Read, check and assemble a model; weights stay memory-mapped unless converted, or are
    read straight onto a CUDA ``device``.

    ``with_experts=False`` skips the routed experts (another backend reads them itself).
    ``skip_linears``: modules whose ``weight`` is not read (left on the meta device, for the
    caller to replace, e.g. by quantized linears from a cache).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    index = read_headers(weight_files(model_dir))
    with torch.device("meta"):
        model = build_model(config)
    expected = plan_tensors(model, config, index)
    if not with_experts:
        expected = {n: s for n, s in expected.items() if ".mlp.experts." not in n}
    skipped = {f"{name}.weight" for name in skip_linears}
    unknown = skipped - {f"{name}.weight" for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"no such linear to skip: {sorted(unknown)[:3]}")
    expected = {n: s for n, s in expected.items() if n not in skipped}
    tensors = read_tensors(expected, index, device)
    compute_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    experts = _split_experts(config, tensors, compute_dtype) if with_experts else {}
    state = {name: (t if ROUTER_KEYS.search(name) else t.to(compute_dtype))
             for name, t in tensors.items()}
    if "lm_head.weight" not in state and "lm_head.weight" not in skipped:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot assemble the model from {model_dir}: {exc}") from exc
    if set(missing) != skipped or unexpected:  # what strict=True checks, less the skipped
        raise ModelLoadError(f"cannot assemble the model from {model_dir}: missing "
                             f"{sorted(set(missing) - skipped)[:5]}, unexpected "
                             f"{sorted(unexpected)[:5]}")
    model.eval()
    log.info("loaded %s from %s (%d tensors, %s)", config.architecture, model_dir.name,
             len(tensors), compute_dtype)
    return LoadedModel(config, model, experts)
