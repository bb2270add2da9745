"""Status and model-management routes: /, /api/version, tags, show, ps, pull, create, copy,
blobs, delete; push answers that krasis has no registry to push to."""

from __future__ import annotations

import asyncio
import datetime
import json
import math

from aiohttp import web
from krasis_registry.sources import SourcePolicy

from krasisd import __version__, api
from krasisd.context import daemon_of, over_tcp
from krasisd.models import canonical_name
from krasisd.routes_inference import read_json
from krasisd.streaming import collect, stream_ndjson


async def root(request: web.Request) -> web.Response:
    """GET and HEAD /: a liveness check."""
    return web.Response(text="krasisd is running")


# The Ollama version /api/version reports. Clients gate features on it (VS Code Copilot
# refuses an Ollama older than 0.6.4); krasis speaks the API of this Ollama release for the
# routes it has. Its own version is in "krasis_version".
OLLAMA_COMPATIBLE_VERSION = "0.12.0"


async def version(request: web.Request) -> web.Response:
    """GET and HEAD /api/version."""
    return web.json_response({"version": OLLAMA_COMPATIBLE_VERSION,
                              "krasis_version": __version__})


async def tags(request: web.Request) -> web.Response:
    """GET /api/tags: the models that are pulled."""
    return web.json_response({"models": await daemon_of(request).catalog.list()})


async def show(request: web.Request) -> web.Response:
    """POST /api/show: one model's details."""
    name = api.model_name(await read_json(request))
    info = await daemon_of(request).catalog.show(name)
    return web.json_response({**info, **ollama_show_fields(info)}, dumps=_dumps)


_MODEL_INFO_KEYS = {  # Ollama's model_info key -> Hugging Face config key(s)
    "context_length": ("max_position_embeddings",),
    "embedding_length": ("hidden_size",),
    "block_count": ("num_hidden_layers",),
    "attention.head_count": ("num_attention_heads",),
    "attention.head_count_kv": ("num_key_value_heads",),
    "expert_count": ("n_routed_experts", "num_experts"),
    "expert_used_count": ("num_experts_per_tok",),
    "vocab_size": ("vocab_size",),
}


def ollama_show_fields(info: dict) -> dict:
    """The fields Ollama's /api/show has (model_info, capabilities, ...) from the registry's."""
    config = info.get("config") or {}
    arch = info.get("model_type") or config.get("model_type") or "unknown"
    model_info = {"general.architecture": arch,
                  "general.parameter_count": (info.get("parameters") or {}).get("total")}
    for key, sources in _MODEL_INFO_KEYS.items():
        value = next((config[s] for s in sources if config.get(s) is not None), None)
        if value is not None:
            model_info[f"{arch}.{key}"] = value
    system = info.get("system") or ""
    options = info.get("options") or {}
    return {"model_info": model_info, "modelfile": _modelfile(info, system, options),
            "parameters": parameters_text(options), "template": "", "system": system,
            "capabilities": ["completion"]}


def parameters_text(options: dict) -> str:
    """Ollama's text form of a model's parameters: one "name value" line per value (a list,
    such as stop, gives a line per item), the name padded to 30 columns, strings quoted."""
    lines = []
    for key, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_parameter_value(item)}")
    return "\n".join(lines)


def _parameter_value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _modelfile(info: dict, system: str, options: dict) -> str:
    """A Modelfile describing the model (for display: krasis' create takes JSON fields)."""
    lines = [f"FROM {info.get('name') or ''}"]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER {line}" for line in parameters_text(options).splitlines()]
    return "\n".join(lines) + "\n"


async def ps(request: web.Request) -> web.Response:
    """GET /api/ps: the loaded models and when they unload."""
    daemon = daemon_of(request)
    models = []
    for item in daemon.scheduler.running():
        spec = item["spec"]
        expires_in_s = item["expires_in_s"]
        models.append({
            "name": spec.name, "model": spec.name, "size": spec.size_bytes,
            "digest": spec.digest, "details": spec.details,
            "expires_at": _expires_at(expires_in_s), "size_vram": item["vram_bytes"],
            "pid": item["pid"], "active_requests": item["active"],
            **({"prefix_cache": item["prefix_cache"]}
               if isinstance(item["prefix_cache"], dict) else {}),
        })
    return web.json_response({"models": models})


_FAR_FUTURE = datetime.datetime(2318, 1, 1, tzinfo=datetime.timezone.utc)


def _expires_at(expires_in_s: float | None) -> str:
    """RFC 3339; a model kept forever (or busy) shows a date far in the future, as Ollama.

    Never fails: a time beyond that date (or not a finite number) shows that date too, and
    one in the past shows now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if expires_in_s is None or not math.isfinite(expires_in_s) or \
            expires_in_s >= (_FAR_FUTURE - now).total_seconds():
        stamp = _FAR_FUTURE
    else:
        stamp = now + datetime.timedelta(seconds=max(expires_in_s, 0.0))
    return stamp.isoformat().replace("+00:00", "Z")


async def pull(request: web.Request) -> web.StreamResponse:
    """POST /api/pull: download a model and build its caches, streaming progress."""
    req = api.pull_request(await read_json(request))
    events = daemon_of(request).catalog.pull(req.model, insecure=req.insecure)
    if req.stream:
        return await stream_ndjson(request, events)
    return web.json_response((await collect(events))[-1])


async def create(request: web.Request) -> web.StreamResponse:
    """POST /api/create: register a model from a folder on this machine.

    Which folders may be read depends on how the request came (SourcePolicy): over TCP any
    local user may be asking, so only KRASIS_CREATE_DIRS; the registry checks the folder
    (no existence check here: that would tell a TCP caller what exists)."""
    req = api.create_request(await read_json(request))
    daemon = daemon_of(request)
    if req.files is not None:  # uploaded blobs (POST /api/blobs)
        events = daemon.catalog.create_from_blobs(req.model, req.files, system=req.system,
                                                  options=req.options)
    elif req.source is not None:  # a model derived from another: a copy with new defaults
        defaults = {k: v for k, v in (("system", req.system), ("options", req.options))
                    if v is not None}
        events = daemon.catalog.copy(req.source, req.model, **defaults)
    else:
        policy = SourcePolicy.for_transport(over_tcp(request), daemon.config.create_dirs)
        events = daemon.catalog.create(req.model, req.path, policy, system=req.system,
                                       options=req.options)
    if req.stream:
        return await stream_ndjson(request, events)
    return web.json_response((await collect(events))[-1])


async def copy(request: web.Request) -> web.Response:
    """POST /api/copy: the model under a second name, sharing its files (hard links)."""
    req = api.copy_request(await read_json(request))
    await collect(daemon_of(request).catalog.copy(req.source, req.destination))
    return web.Response(status=200)


async def push(request: web.Request) -> web.Response:
    """POST /api/push: krasis has no model registry to push to."""
    raise api.ApiError(501, "push is not supported: krasis pulls from the Hugging Face Hub "
                            "and has no registry to push models to")


async def blob_exists(request: web.Request) -> web.Response:
    """HEAD /api/blobs/{digest}: 200 when that blob was uploaded, else 404."""
    try:
        found = await daemon_of(request).catalog.has_blob(request.match_info["digest"])
    except ValueError as exc:
        raise api.bad_request(str(exc)) from None
    return web.Response(status=200 if found else 404)


async def blob_upload(request: web.Request) -> web.Response:
    """POST /api/blobs/{digest}: store the body as a blob, checked against its sha256; 201.

    No size limit but the disk's (a model file is gigabytes); a body that stalls for
    KRASIS_BODY_TIMEOUT is dropped (408)."""
    daemon = daemon_of(request)
    timeout_s = daemon.config.body_timeout_s

    async def read() -> bytes:
        try:
            return await asyncio.wait_for(request.content.readany(), timeout_s)
        except asyncio.TimeoutError:
            raise api.ApiError(408, f"the blob upload stalled for {timeout_s:g} s "
                                    "(KRASIS_BODY_TIMEOUT)") from None

    try:
        await daemon.catalog.upload_blob(request.match_info["digest"], read)
    except ValueError as exc:
        raise api.bad_request(str(exc)) from None
    return web.Response(status=201)


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/delete: remove a model; an idle loaded model is unloaded first."""
    daemon = daemon_of(request)
    name = api.model_name(await read_json(request))
    full = canonical_name(name)
    if daemon.scheduler.is_loaded(full) and not daemon.scheduler.is_busy(full):
        await daemon.scheduler.unload(full)
    await daemon.catalog.remove(name, is_loaded=lambda _name: daemon.scheduler.is_busy(full))
    return web.Response(status=200)


def _dumps(value) -> str:
    return json.dumps(value, default=str)

