"""The CPU half of the dual-format cache: a model's routed experts and dense linears quantized
once for the native kernels, safetensors files plus ``manifest.json``.

Per layer file ``layer_{l:03d}.safetensors``: ``{gate,up,down}.qweight`` and ``.scales`` in the
layout of docs/cpu-format.md (E experts, D hidden, I expert width, G group size):
gate/up qweight [E, I, D] int8 or [E, I, D/2] uint8, scales float32 [E, I, D/G];
down qweight [E, D, I] or [E, D, I/2], scales [E, D, I/G].
Dense linears (dense_plan.dense_plan: attention, shared experts, dense MLPs, output head) go
to ``dense_{l:03d}.safetensors`` per decoder layer and ``dense_other.safetensors`` (the head):
``{name}.qweight`` [N, K] int8 or [N, K/2] uint8 and ``{name}.scales`` [N, K/G'] float32, each
linear with its own bits and group size G' (recorded in the manifest).

Integrity: the build records each file's size, mtime and full sha256 (and the sha256 of its
safetensors header). A load checks size and header digest always, and re-hashes the whole file
when its mtime changed since the build (or ``verify="full"``), so truncated or rewritten files
raise CacheError. Loads memory-map the files: no copy, no re-quantization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from krasisd.engine import loader
from krasisd.engine.cache_files import (
    HEADER_LEN_BYTES,
    building_dir,
    safetensors_header,
    sha256_file,
)
from krasisd.engine.dense_plan import HEAD_NAME, dense_plan, quantize_weight
from krasisd.engine.models import build_model
from krasisd.engine.quant import BITS, LAYOUT_VERSION, check_format, quantize

log = logging.getLogger(__name__)

FORMAT = "krasis-cpu-experts"
MANIFEST = "manifest.json"
PROJS = ("gate", "up", "down")
NP_DTYPES = {"I8": np.int8, "U8": np.uint8, "F32": np.float32}
QWEIGHT_DTYPES = {8: np.int8, 4: np.uint8}
DENSE_OTHER = "dense_other.safetensors"  # linears outside the decoder layers: the output head
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
FINGERPRINT_SAMPLES = 16
FINGERPRINT_SAMPLE_BYTES = 64 << 10


class CacheError(Exception):
    """A CPU cache is missing, corrupt, or in another format/layout: rebuild it."""


@dataclass
class LayerExperts:
    """One MoE layer's quantized experts as read-only arrays over the mapped file."""

    gate_q: np.ndarray
    gate_s: np.ndarray
    up_q: np.ndarray
    up_s: np.ndarray
    down_q: np.ndarray
    down_s: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.gate_q, self.gate_s, self.up_q, self.up_s, self.down_q, self.down_s)


@dataclass
class DenseWeight:
    """One quantized dense linear W [N, K] as read-only arrays over the mapped file."""

    qweight: np.ndarray  # [N, K] int8 or [N, K/2] uint8
    scales: np.ndarray  # [N, K/G] float32
    bits: int
    group_size: int
    in_features: int


@dataclass
class CpuCache:
    manifest: dict
    layers: dict[int, LayerExperts]
    dense: dict[str, DenseWeight] = field(default_factory=dict)  # linear name -> weights

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def group_size(self) -> int:
        return int(self.manifest["group_size"])


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and each weight file's name, size, safetensors header and
    FINGERPRINT_SAMPLES evenly spaced 64 KiB samples (cheap: ~1 MiB read per file)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in loader.weight_files(model_dir):
        size_bytes = path.stat().st_size
        digest.update(f"{path.name}:{size_bytes}:".encode())
        digest.update(safetensors_header(path))
        with open(path, "rb") as handle:
            for i in range(FINGERPRINT_SAMPLES):
                handle.seek(size_bytes * i // FINGERPRINT_SAMPLES)
                digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def build_cpu_cache(model_dir: str | Path, out_dir: str | Path, quant: str = "int4",
                    group_size: int = 128, progress: Callable[[int, int], None] | None = None,
                    dense: bool = True) -> dict:
    """Quantize the routed experts (and, with ``dense``, the dense linears as the CPU path
    uses them) of ``model_dir`` into ``out_dir``; returns the manifest. ``progress`` counts
    MoE layers."""
    if quant not in BITS:
        raise ValueError(f"quant must be one of {tuple(BITS)}, got {quant!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = loader.read_config(model_dir)
    bits = BITS[quant]
    check_format(bits, group_size, config.hidden_size)
    check_format(bits, group_size, config.moe_intermediate_size)
    index = loader.read_headers(loader.weight_files(model_dir))
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    dense_jobs = _dense_jobs(config, index, bits) if dense else {}
    with building_dir(out_dir) as tmp_dir:
        files, dense_files, dense_linears = _write_files(
            tmp_dir, config, index, quant, group_size, layers, dense_jobs, progress)
        manifest = cache_manifest(config, quant, group_size, model_fingerprint(model_dir),
                                  files, dense_files, dense_linears)
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("built CPU cache %s: %d layers, %d dense linears, %s g%d", out_dir, len(layers),
             len(dense_linears), quant, group_size)
    return manifest


def cache_manifest(config, quant: str, group_size: int, fingerprint: str, layers: dict,
                   dense_files: dict | None = None, dense: dict | None = None) -> dict:
    """The manifest of a CPU cache: ``layers`` {layer: file_record}, and the dense linears'
    files and entries when the cache holds them."""
    return {
        "format": FORMAT, "layout_version": LAYOUT_VERSION, "quant": quant, "bits": BITS[quant],
        "group_size": group_size, "n_experts": config.n_routed_experts,
        "hidden": config.hidden_size, "width": config.moe_intermediate_size,
        "model_fingerprint": fingerprint, "created": time.time(),
        "layers": layers, "dense_files": dense_files or {}, "dense": dense or {},
    }


def _write_files(tmp_dir: Path, config, index, quant: str, group_size: int, layers: list[int],
                 dense_jobs: dict, progress) -> tuple[dict, dict, dict]:
    """Expert files per MoE layer, and each dense file once the layers it covers are done (so
    progress keeps counting MoE layers); returns the manifest's three tables."""
    files, dense_files, dense_linears = {}, {}, {}
    pending = sorted(dense_jobs)  # decoder layers in order, the rest last

    def write_dense(up_to_layer: int) -> None:
        while pending and pending[0] <= up_to_layer:
            layer = pending.pop(0)
            file_name = (f"dense_{layer:03d}.safetensors" if layer < config.num_hidden_layers
                         else DENSE_OTHER)
            record, linears = _write_dense_file(tmp_dir, file_name, dense_jobs[layer], index,
                                                quant)
            dense_files[record["file"]] = record
            dense_linears.update(linears)

    for done, layer_idx in enumerate(layers, start=1):
        tensors = _quantize_layer(config, layer_idx, index, BITS[quant], group_size)
        name = f"layer_{layer_idx:03d}.safetensors"
        save_file(tensors, str(tmp_dir / name), metadata={"format": FORMAT, "quant": quant})
        files[str(layer_idx)] = file_record(tmp_dir / name, name)
        write_dense(config.num_hidden_layers if done == len(layers) else layer_idx)
        if progress is not None:
            progress(done, len(layers))
    write_dense(config.num_hidden_layers)
    return files, dense_files, dense_linears


def _dense_jobs(config, index, bits: int) -> dict[int, list[tuple]]:
    """Decoder layer (num_hidden_layers for the rest) -> [(linear name, checkpoint tensor,
    bits, group size, (N, K))] from dense_plan over a model on the meta device."""
    with torch.device("meta"):
        model = build_model(config)
    jobs: dict[int, list[tuple]] = {}
    for name, linear, bits_, group in dense_plan(model, bits):
        tensor = f"{name}.weight"
        if name == HEAD_NAME and tensor not in index and config.tie_word_embeddings:
            tensor = "model.embed_tokens.weight"
        if tensor not in index:
            raise ValueError(f"the checkpoint has no tensor {tensor} for the dense linear {name}")
        match = LAYER_NAME.match(name)
        layer = int(match.group(1)) if match else config.num_hidden_layers
        shape = (linear.out_features, linear.in_features)
        jobs.setdefault(layer, []).append((name, tensor, bits_, group, shape))
    return jobs


def _write_dense_file(tmp_dir: Path, file_name: str, jobs: list[tuple], index, quant: str
                      ) -> tuple[dict, dict]:
    """Quantize one file's dense linears (dense_plan.quantize_weight) into ``file_name``;
    returns its file record and the manifest entries of its linears."""
    floats = loader.read_tensors({tensor for _, tensor, *_ in jobs}, index)
    tensors, linears = {}, {}
    for name, tensor, bits, group, shape in jobs:
        if tuple(floats[tensor].shape) != shape:
            raise ValueError(f"tensor {tensor} has shape {list(floats[tensor].shape)}, "
                             f"the model expects {list(shape)}")
        qweight, scales = quantize_weight(floats[tensor], bits, group)
        tensors[f"{name}.qweight"] = torch.from_numpy(qweight)  # [N, K] or [N, K/2]
        tensors[f"{name}.scales"] = torch.from_numpy(scales)  # [N, K/G]
        linears[name] = {"file": file_name, "bits": bits, "group_size": group,
                         "out_features": shape[0], "in_features": shape[1]}
    save_file(tensors, str(tmp_dir / file_name),
              metadata={"format": FORMAT, "quant": quant, "part": "dense"})
    return file_record(tmp_dir / file_name, file_name), linears


def load_cpu_cache(out_dir: str | Path, quant: str | None = None, group_size: int | None = None,
                   model_dir: str | Path | None = None, verify: str = "quick") -> CpuCache:
    """Memory-map a built cache; raises CacheError if it is absent, stale, corrupt or foreign."""
    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', got {verify!r}")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    _check_manifest(manifest, quant, group_size, model_dir)
    layers = {}
    for key, record in manifest["layers"].items():
        path = out_dir / record["file"]
        _verify_file(path, record, full=verify == "full")
        layers[int(key)] = _map_layer(path, manifest)
    return CpuCache(manifest, layers, _map_dense(out_dir, manifest, full=verify == "full"))


def _map_dense(out_dir: Path, manifest: dict, full: bool) -> dict[str, DenseWeight]:
    """The dense linears of the manifest over their checked, mapped files."""
    mapped = {}
    for file_name, record in manifest.get("dense_files", {}).items():
        _verify_file(out_dir / record["file"], record, full)
        mapped[file_name] = _mmap_safetensors(out_dir / record["file"])
    dense = {}
    for name, info in manifest.get("dense", {}).items():
        try:
            arrays, bits = mapped[info["file"]], int(info["bits"])
            group, n, k = (int(info[key]) for key in ("group_size", "out_features", "in_features"))
            qweight, scales = arrays[f"{name}.qweight"], arrays[f"{name}.scales"]
            check_format(bits, group, k)
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"dense linear {name}: bad manifest entry or tensor ({exc})") from exc
        if (qweight.dtype != QWEIGHT_DTYPES[bits] or qweight.shape != (n, k * bits // 8)
                or scales.shape != (n, k // group)):
            raise CacheError(f"dense linear {name}: tensors do not match {bits}-bit [{n}, {k}] "
                             f"in groups of {group}")
        dense[name] = DenseWeight(qweight, scales, bits, group, k)
    return dense


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheError(f"no CPU cache at {out_dir}") from exc
    except (OSError, ValueError) as exc:
        raise CacheError(f"unreadable manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CacheError(f"manifest {path} is not a JSON object")
    return manifest


def _check_manifest(manifest: dict, quant, group_size, model_dir) -> None:
    if manifest.get("format") != FORMAT or manifest.get("layout_version") != LAYOUT_VERSION:
        raise CacheError(f"cache format {manifest.get('format')!r} layout "
                         f"{manifest.get('layout_version')!r}, expected {FORMAT!r} {LAYOUT_VERSION}")
    if quant is not None and manifest.get("quant") != quant:
        raise CacheError(f"cache holds {manifest.get('quant')!r}, wanted {quant!r}")
    if group_size is not None and manifest.get("group_size") != group_size:
        raise CacheError(f"cache group size {manifest.get('group_size')}, wanted {group_size}")
    if model_dir is not None and manifest.get("model_fingerprint") != model_fingerprint(model_dir):
        raise CacheError("cache was built from other weights (model fingerprint differs)")
    if not isinstance(manifest.get("layers"), dict):
        raise CacheError("manifest has no layer table")
    if not all(isinstance(manifest.get(key, {}), dict) for key in ("dense", "dense_files")):
        raise CacheError("manifest has a malformed dense table")


def _quantize_layer(config, layer_idx: int, index, bits: int, group_size: int):
    names = loader.expert_names(config, layer_idx, index)
    floats = loader.read_tensors(names, index)
    inter = config.moe_intermediate_size
    fused = f"model.layers.{layer_idx}.mlp.experts.gate_up_proj"
    if fused in floats:
        gate_up = floats[fused]  # [E, 2I, D]
        stacks = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:],
                  "down": floats[f"model.layers.{layer_idx}.mlp.experts.down_proj"]}
    else:
        prefix = f"model.layers.{layer_idx}.mlp.experts"
        stacks = {proj: [floats[f"{prefix}.{e}.{proj}_proj.weight"]
                         for e in range(config.n_routed_experts)] for proj in PROJS}
    tensors = {}
    for proj, experts in stacks.items():
        packed = [quantize(w, bits, group_size) for w in experts]  # per expert: bounded memory
        tensors[f"{proj}.qweight"] = torch.stack([q for q, _ in packed])  # [E, N, K or K/2]
        tensors[f"{proj}.scales"] = torch.stack([s for _, s in packed])  # [E, N, K/G]
    return tensors


def file_record(path: Path, name: str) -> dict:
    stat = path.stat()
    return {"file": name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": sha256_file(path), "header_sha256": hashlib.sha256(safetensors_header(path)).hexdigest()}


def _verify_file(path: Path, record: dict, full: bool) -> None:
    try:
        stat = path.stat()
    except OSError as exc:
        raise CacheError(f"cache file {path.name} is missing: {exc}") from exc
    if stat.st_size != record.get("bytes"):
        raise CacheError(f"cache file {path.name} has {stat.st_size} bytes, "
                         f"the manifest says {record.get('bytes')} (truncated?)")
    try:
        header_digest = hashlib.sha256(safetensors_header(path)).hexdigest()
    except (OSError, ValueError) as exc:
        raise CacheError(f"cache file {path.name} has a bad header: {exc}") from exc
    if header_digest != record.get("header_sha256"):
        raise CacheError(f"cache file {path.name}: header checksum mismatch")
    if full or stat.st_mtime_ns != record.get("mtime_ns"):
        if sha256_file(path) != record.get("sha256"):
            raise CacheError(f"cache file {path.name}: checksum mismatch (corrupted)")


def _map_layer(path: Path, manifest: dict) -> LayerExperts:
    arrays = _mmap_safetensors(path)
    e, d, i, g = (manifest[k] for k in ("n_experts", "hidden", "width", "group_size"))
    div = 2 if manifest["bits"] == 4 else 1
    expected = {"gate.qweight": (e, i, d // div), "gate.scales": (e, i, d // g),
                "up.qweight": (e, i, d // div), "up.scales": (e, i, d // g),
                "down.qweight": (e, d, i // div), "down.scales": (e, d, i // g)}
    for name, shape in expected.items():
        if name not in arrays or arrays[name].shape != shape:
            raise CacheError(f"{path.name}: tensor {name} missing or not of shape {shape}")
    return LayerExperts(*(arrays[f"{p}.{part}"] for p in PROJS for part in ("qweight", "scales")))


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Zero-copy read-only views of a safetensors file (safetensors' own numpy loader copies)."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")  # [bytes]
    header_bytes = safetensors_header(path)
    base = HEADER_LEN_BYTES + len(header_bytes)
    out = {}
    for name, info in json.loads(header_bytes).items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in NP_DTYPES:
            raise CacheError(f"{path.name}: unexpected dtype {info['dtype']} for {name}")
        start, end = info["data_offsets"]
        view = mapped[base + start:base + end].view(NP_DTYPES[info["dtype"]])
        out[name] = view.reshape(info["shape"])
    return out
