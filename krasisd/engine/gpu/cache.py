"""The GPU half of the dual-format cache: routed experts in the GPU format (docs/gpu-format.md),
one safetensors file per MoE layer holding ``experts`` uint8 [E, B] blobs, plus manifest.json.

The build writes into a temporary folder and renames it into place, so a cache is either
complete or absent. A load reads each layer file straight into page-locked host memory
(one pass, no intermediate copy) after checking sizes and header checksums; ``verify="full"``
re-hashes every byte. Nothing is re-quantized at load.

Legend: E = experts, B = bytes of one expert blob.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from krasisd.engine import loader
from krasisd.engine.cache_files import (
    HEADER_LEN_BYTES,
    building_dir,
    safetensors_header,
    sha256_file,
)
from krasisd.engine.cpu_cache import model_fingerprint
from krasisd.engine.gpu.format import FORMAT_NAME, LAYOUT_VERSION, ExpertLayout, QuantSpec
from krasisd.engine.gpu.host import HostExperts, can_pin, empty_host, map_pinned

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TENSOR = "experts"
QUANT_BATCH_EXPERTS = 8  # experts quantized together: bounds float temporaries


class GpuCacheError(Exception):
    """A GPU cache is missing, corrupt, stale or in another format: rebuild it."""


def build_gpu_cache(model_dir: str | Path, out_dir: str | Path, quant: str = "int4",
                    group_size: int = 128, progress: Callable[[int, int], None] | None = None,
                    device: str | torch.device | None = None) -> dict:
    """Quantize the routed experts of ``model_dir`` into ``out_dir``; returns the manifest."""
    spec = QuantSpec.from_quant(quant, group_size)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = loader.read_config(model_dir)
    layout = ExpertLayout(config.hidden_size, config.moe_intermediate_size, spec)
    index = loader.read_headers(loader.weight_files(model_dir))
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with building_dir(out_dir) as tmp_dir:
        files = {}
        for done, layer_idx in enumerate(layers, start=1):
            blobs = _quantize_layer(config, layer_idx, index, layout, device)  # [E, B]
            name = f"layer_{layer_idx:03d}.safetensors"
            save_file({TENSOR: blobs}, str(tmp_dir / name), metadata={"format": FORMAT_NAME})
            files[str(layer_idx)] = file_record(tmp_dir / name)
            if progress is not None:
                progress(done, len(layers))
        manifest = cache_manifest(config, layout, model_fingerprint(model_dir), files)
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("built GPU cache %s: %d layers, %s g%d", out_dir, len(layers), quant, group_size)
    return manifest


def cache_manifest(config, layout: ExpertLayout, fingerprint: str, files: dict) -> dict:
    return {
        "format": FORMAT_NAME, "layout_version": LAYOUT_VERSION, "layout": "k-major",
        "quant": layout.spec.quant, "bits": layout.spec.bits,
        "group_size": layout.spec.group_size, "n_experts": config.n_routed_experts,
        "hidden": layout.hidden, "intermediate": layout.intermediate,
        "expert_bytes": layout.expert_bytes,
        "parts": {k: list(v) for k, v in layout.part_offsets().items()},
        "model_fingerprint": fingerprint, "created": time.time(), "layers": files,
    }


def _quantize_layer(config, layer_idx, index, layout: ExpertLayout, device) -> torch.Tensor:
    names = loader.expert_names(config, layer_idx, index)
    floats = loader.read_tensors(names, index)
    prefix = f"model.layers.{layer_idx}.mlp.experts"
    inter, num = config.moe_intermediate_size, config.n_routed_experts
    out = torch.empty(num, layout.expert_bytes, dtype=torch.uint8)  # [E, B]
    for first in range(0, num, QUANT_BATCH_EXPERTS):
        ids = range(first, min(num, first + QUANT_BATCH_EXPERTS))
        if f"{prefix}.gate_up_proj" in floats:
            gate_up = floats[f"{prefix}.gate_up_proj"][first : ids.stop].to(device)  # [e, 2I, D]
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            down = floats[f"{prefix}.down_proj"][first : ids.stop].to(device)
        else:
            gate, up, down = (torch.stack([floats[f"{prefix}.{e}.{p}_proj.weight"] for e in ids])
                              .to(device) for p in ("gate", "up", "down"))
        out[first : ids.stop] = layout.pack_experts(gate.float(), up.float(), down.float()).cpu()
    return out


def load_gpu_cache(out_dir: str | Path, quant: str | None = None, group_size: int | None = None,
                   model_dir: str | Path | None = None, verify: str = "quick",
                   pin: bool | None = None) -> HostExperts:
    """Read a built cache into (pinned when CUDA is there) host memory; raises GpuCacheError."""
    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', got {verify!r}")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    _check_manifest(manifest, quant, group_size, model_dir)
    spec = QuantSpec(int(manifest["bits"]), int(manifest["group_size"]))
    layout = ExpertLayout(int(manifest["hidden"]), int(manifest["intermediate"]), spec)
    if layout.expert_bytes != manifest.get("expert_bytes"):
        raise GpuCacheError("manifest expert_bytes does not match this layout version")
    num = int(manifest["n_experts"])
    layers = {}
    for key, record in manifest["layers"].items():
        path = out_dir / record["file"]
        _verify_file(path, record, full=verify == "full")
        layers[int(key)] = _read_blobs(path, num, layout.expert_bytes, pin)
    return HostExperts(layout, layers, num)


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise GpuCacheError(f"no GPU cache at {out_dir}") from exc
    except (OSError, ValueError) as exc:
        raise GpuCacheError(f"unreadable manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        raise GpuCacheError(f"manifest {path} is not a GPU cache manifest")
    return manifest


def _check_manifest(manifest: dict, quant, group_size, model_dir) -> None:
    if manifest.get("format") != FORMAT_NAME or manifest.get("layout_version") != LAYOUT_VERSION:
        raise GpuCacheError(f"cache format {manifest.get('format')!r} layout "
                            f"{manifest.get('layout_version')!r}, expected {FORMAT_NAME!r} "
                            f"{LAYOUT_VERSION}")
    if quant is not None and manifest.get("quant") != quant:
        raise GpuCacheError(f"cache holds {manifest.get('quant')!r}, wanted {quant!r}")
    if group_size is not None and manifest.get("group_size") != group_size:
        raise GpuCacheError(f"cache group size {manifest.get('group_size')}, wanted {group_size}")
    if model_dir is not None and manifest.get("model_fingerprint") != model_fingerprint(model_dir):
        raise GpuCacheError("cache was built from other weights (model fingerprint differs)")


def _header(path: Path) -> tuple[bytes, int]:
    """The file's safetensors header and where its data starts (cache_files' reader)."""
    try:
        header = safetensors_header(path)
    except ValueError as exc:
        raise GpuCacheError(str(exc)) from exc
    return header, HEADER_LEN_BYTES + len(header)


def _read_blobs(path: Path, num: int, expert_bytes: int, pin: bool | None) -> torch.Tensor:
    """The ``experts`` tensor read straight into a (pinned) host buffer: [E, B]."""
    header, base = _header(path)
    info = json.loads(header).get(TENSOR)
    if not info or info.get("dtype") != "U8" or info.get("shape") != [num, expert_bytes]:
        raise GpuCacheError(f"{path.name}: no {TENSOR} U8 [{num}, {expert_bytes}] tensor")
    start, end = info["data_offsets"]
    if can_pin() if pin is None else pin:
        try:
            mapped = map_pinned(path, base + start, end - start)  # [E*B], no copy
        except ValueError as exc:
            raise GpuCacheError(str(exc)) from exc
        if mapped is not None:
            return mapped.view(num, expert_bytes)
    buf = empty_host(end - start, pin)  # [E*B]
    with open(path, "rb") as handle:
        handle.seek(base + start)
        got = handle.readinto(memoryview(buf.numpy()))
    if got != end - start:
        raise GpuCacheError(f"{path.name}: short read ({got} of {end - start} bytes)")
    return buf.view(num, expert_bytes)


def file_record(path: Path) -> dict:
    header, _ = _header(path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "header_sha256": hashlib.sha256(header).hexdigest()}


def _verify_file(path: Path, record: dict, full: bool) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GpuCacheError(f"cache file {path.name} is missing: {exc}") from exc
    if size != record.get("bytes"):
        raise GpuCacheError(f"cache file {path.name} has {size} bytes, the manifest says "
                            f"{record.get('bytes')} (truncated?)")
    header, _ = _header(path)
    if hashlib.sha256(header).hexdigest() != record.get("header_sha256"):
        raise GpuCacheError(f"cache file {path.name}: header checksum mismatch")
    if full and sha256_file(path) != record.get("sha256"):
        raise GpuCacheError(f"cache file {path.name}: checksum mismatch (corrupted)")


