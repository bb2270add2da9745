"""Cache builds: the CPU format always, the GPU format with CUDA or on request.

A builder is `builder(model_dir, out_dir, quant=..., group_size=..., progress=cb) -> manifest`
(krasisd.engine.cpu_cache.build_cpu_cache and krasisd.engine.gpu.cache.build_gpu_cache),
run in a child process (buildproc.py).
The row goes building -> ready | failed(error). A build interrupted by a crash leaves its
row in 'building' with no live lock holder; the next open discards the folder and marks the
row failed, and the next pull builds it again. Nothing reads a cache that is not ready.
"""

import functools
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sqlite_utils import Database

from . import records
from .buildproc import run_builder
from .errors import PullError
from .store import Store, tree_bytes

log = logging.getLogger(__name__)

Builder = Callable[..., dict]
FORMATS = ("cpu", "gpu")
GROUP_SIZES = (128, 64, 32)
INT4_UNIT = 64
CUDA_PROBE_TIMEOUT_S = 120


def _build_cpu(model_dir, out_dir, **kwargs) -> dict:
    from krasisd.engine.cpu_cache import build_cpu_cache

    return build_cpu_cache(model_dir, out_dir, **kwargs)


def _build_gpu(model_dir, out_dir, **kwargs) -> dict:
    from krasisd.engine.gpu.cache import build_gpu_cache

    return build_gpu_cache(model_dir, out_dir, **kwargs)


DEFAULT_BUILDERS: dict[str, Builder] = {"cpu": _build_cpu, "gpu": _build_gpu}


@functools.cache
def cuda_available() -> bool:
    """torch.cuda.is_available(), asked in a child process unless torch is already loaded here
    (the daemon does not import torch; the answer is kept for the life of the process)."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                timeout=CUDA_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot tell whether CUDA is present (%s): building the cpu format only", exc)
        return False
    return result.returncode == 0


def formats_to_build(build_caches: bool | Iterable[str]) -> list[str]:
    """True: cpu, plus gpu when CUDA is present; False: none; or an explicit list of formats."""
    if build_caches is True:
        return ["cpu", "gpu"] if cuda_available() else ["cpu"]
    if build_caches is False or build_caches is None:
        return []
    wanted = [str(f) for f in build_caches]
    unknown = sorted(set(wanted) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown cache format(s) {unknown}: use {list(FORMATS)}")
    return ["cpu"] + [f for f in FORMATS if f in wanted and f != "cpu"]


def auto_group_size(config: dict, quant: str) -> int | None:
    """The group size the engine picks for this model (krasisd.engine.native_experts.
    pick_group_size, mirrored so the daemon need not import torch; a test keeps them equal):
    the largest of 128, 64, 32 dividing the hidden size and the expert width, INT4 also
    needing multiples of 64. None when no group size fits."""
    hidden = int(config.get("hidden_size") or 0)
    width = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
    if hidden <= 0 or width <= 0:
        return None
    if quant == "int4" and (hidden % INT4_UNIT or width % INT4_UNIT):
        return None
    return next((g for g in GROUP_SIZES if hidden % g == 0 and width % g == 0), None)


QUANT_FALLBACKS = {"int4": ("int4", "int8"), "int8": ("int8",)}  # "none": nothing to build

# architectures the native INT4/INT8 expert kernels cannot run yet, and why: served unquantized
NOT_QUANTIZABLE = {
    "GptOssForCausalLM": "the native INT4/INT8 expert kernels do not take gpt-oss's expert "
                         "biases and clamped SwiGLU yet",
}
_explained: set[str] = set()


def not_quantizable(config: dict) -> str | None:
    """Why the model's architecture cannot be served from an INT4/INT8 cache (the reason and
    "served unquantized"); None when it can."""
    for where in (config, config.get("text_config")):
        architectures = where.get("architectures") if isinstance(where, dict) else None
        for arch in architectures if isinstance(architectures, list) else ():
            if arch in NOT_QUANTIZABLE:
                return f"{arch}: {NOT_QUANTIZABLE[arch]}; it is served unquantized"
    return None


def pick_quant(config: dict, quant: str,
               group_size: int | None = None) -> tuple[str, int] | None:
    """(quantization, group size) a model is served with when ``quant`` is asked for: quant
    itself when the CPU kernels can hold the model's shapes, else INT8 in place of INT4
    (``group_size`` pins quant at that group size instead).
    None: no quantized format fits, the architecture has no quantized kernels yet
    (NOT_QUANTIZABLE: logged once, with why), or quant is "none"; the weights load as they
    are. The pull-time cache build and the daemon's choice both ask this, so the cache the
    registry builds is the one the runner loads."""
    if quant not in QUANT_FALLBACKS:
        return None
    reason = not_quantizable(config)
    if reason is not None:
        if reason not in _explained:
            _explained.add(reason)
            log.warning("not quantizing to %s: %s", quant, reason)
        return None
    if group_size:
        return quant, group_size
    for candidate in QUANT_FALLBACKS.get(quant, ()):
        group_size = auto_group_size(config, candidate)
        if group_size is not None:
            return candidate, group_size
    return None


QUANT_BYTES_PER_PARAM = {"int4": 0.5, "int8": 1.0}


def cache_bytes_floor(config: dict, quant: str) -> int:
    """At least how many bytes one cache of ``quant`` takes: it holds every linear of the
    model (experts, attention, dense MLPs, the output head) at that width, so the parameters
    config.json's sizes imply (krasisd.engine.limits.implied_parameters, a lower estimate)
    less the input embedding, times the bytes a parameter takes (scales not counted)."""
    from krasisd.engine.limits import implied_parameters

    per_param = QUANT_BYTES_PER_PARAM.get(quant, 0.0)
    best = 0
    for where in (config, config.get("text_config")):
        if not isinstance(where, dict):
            continue
        hidden, vocab = where.get("hidden_size"), where.get("vocab_size")
        embedding = hidden * vocab if isinstance(hidden, int) and isinstance(vocab, int) else 0
        best = max(best, max(implied_parameters(where) - embedding, 0))
    return int(best * per_param)


def record_not_applicable(db: Database, model: dict, fmt: str, quant: str) -> dict:
    """A failed row (group size 0) saying why this format cannot hold the model (its shapes,
    or an architecture without quantized kernels)."""
    config = json.loads(model["config_json"] or "{}")
    tried = " or ".join(QUANT_FALLBACKS.get(quant, (quant,)))
    reason = not_quantizable(config)
    if reason is not None:
        error = f"not built: {reason}"
    else:
        error = (f"not built: {tried} needs the hidden size ({config.get('hidden_size')}) and "
                 f"the expert width ({config.get('moe_intermediate_size')}) to be multiples of "
                 f"{min(GROUP_SIZES)}"
                 f"{f' (and of {INT4_UNIT} for int4)' if 'int4' in tried else ''}"
                 "; the weights load as they are")
    cache_id = records.begin_cache(db, model["id"], fmt, quant, 0, "")
    records.fail_cache(db, cache_id, error)
    return {"status": f"skipping {fmt} cache: {error}"}


def manifest_checksum(manifest: dict) -> str:
    given = manifest.get("checksum") or manifest.get("sha256")
    if isinstance(given, str) and given:
        return given
    text = json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def build(db: Database, store: Store, model: dict, ref, fmt: str, builder: Builder,
          quant: str, group_size: int) -> Iterator[dict]:
    """Build one cache format for a ready model, streaming progress events."""
    out_dir = store.cache_dir(ref, fmt, quant, group_size)
    cache_id = records.begin_cache(db, model["id"], fmt, quant, group_size, str(out_dir))
    store.remove_tree(out_dir, "caches")
    store.make_private_dir(out_dir.parent)
    status = f"building {fmt} cache"
    yield {"status": status, "total": 0, "completed": 0}
    model_dir = store.model_dir(ref)
    try:
        for kind, value in run_builder(builder, model_dir, out_dir, quant, group_size):
            if kind == "progress":
                completed, total = value
                yield {"status": status, "total": total, "completed": completed}
            else:
                manifest = value if isinstance(value, dict) else {}
        if not out_dir.is_dir():
            raise PullError(f"the {fmt} cache builder wrote nothing to {out_dir}")
    except BaseException as exc:  # a stream closed early (GeneratorExit) counts too
        error = f"{fmt} cache build failed: {exc}" if isinstance(exc, Exception) else \
            f"{fmt} cache build cancelled; it is rebuilt on the next pull"
        log.warning("cache build of %s: %s", ref.full, error)
        records.fail_cache(db, cache_id, error)
        store.remove_tree(out_dir, "caches")
        if isinstance(exc, Exception):
            raise PullError(error) from exc
        raise
    layout = manifest.get("layout_version", manifest.get("version"))
    records.finish_cache(db, cache_id, layout, tree_bytes(out_dir), manifest_checksum(manifest))
    log.info("%s cache of %s ready at %s", fmt, ref.full, out_dir)


def discard_interrupted(db: Database, store: Store, cache: dict) -> None:
    """A 'building' row whose builder is gone: delete its folder, record why it failed."""
    current = db.execute("SELECT state FROM caches WHERE id = ?", [cache["id"]]).fetchone()
    if current is None or current[0] != "building":
        return
    path = Path(cache["path"])
    if path.is_relative_to(store.home / "caches"):
        store.remove_tree(path, "caches")
    records.fail_cache(db, cache["id"], "interrupted: the process building it stopped; "
                       "it is rebuilt on the next pull")
    log.warning("discarded interrupted %s cache build of %s", cache["format"],
                cache["model_name"])


def sweep_cache_orphans(db: Database, store: Store, model: dict, ref) -> None:
    """Delete entries of the model's cache folder that no ready or building row names."""
    root = store.cache_root(ref)
    if not root.is_dir():
        return
    known = {Path(c["path"]).name for c in records.caches_of(db, model["id"])
             if c["state"] in ("ready", "building")}
    for entry in root.iterdir():
        if entry.name not in known:
            log.warning("removing orphan cache entry %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                store.remove_tree(entry, "caches")
            else:
                entry.unlink()
