"""Status and model-management routes: /, /api/version, tags, show, ps, pull, create, delete."""

from __future__ import annotations

import datetime
import json

from aiohttp import web
from krasis_registry.sources import SourcePolicy

from krasisd import __version__, api
from krasisd.context import daemon_of
from krasisd.models import canonical_name
from krasisd.routes_inference import read_json
from krasisd.streaming import collect, stream_ndjson


async def root(request: web.Request) -> web.Response:
    """GET and HEAD /: a liveness check."""
    return web.Response(text="krasisd is running")


async def version(request: web.Request) -> web.Response:
    """GET /api/version."""
    return web.json_response({"version": __version__})


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
    return {"model_info": model_info, "modelfile": "", "parameters": "", "template": "",
            "capabilities": ["completion"]}


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
        })
    return web.json_response({"models": models})


def _expires_at(expires_in_s: float | None) -> str:
    """RFC 3339; a model kept forever (or busy) shows a date far in the future, as Ollama."""
    if expires_in_s is None:
        stamp = datetime.datetime(2318, 1, 1, tzinfo=datetime.timezone.utc)
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=expires_in_s)
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
    policy = SourcePolicy.for_transport(over_tcp(request), daemon.config.create_dirs)
    events = daemon.catalog.create(req.model, req.path, policy)
    if req.stream:
        return await stream_ndjson(request, events)
    return web.json_response((await collect(events))[-1])


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/delete: remove a model; an idle loaded model is unloaded first."""
    daemon = daemon_of(request)
    name = api.model_name(await read_json(request))
    full = canonical_name(name)
    if daemon.scheduler.is_loaded(full) and not daemon.scheduler.is_busy(full):
        await daemon.scheduler.unload(full)
    await daemon.catalog.remove(name, is_loaded=lambda _name: daemon.scheduler.is_busy(full))
    return web.Response(status=200)


def over_tcp(request: web.Request) -> bool:
    """Whether the request came over the TCP listener (a peer address), not the Unix socket."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return isinstance(peer, tuple)


def _dumps(value) -> str:
    return json.dumps(value, default=str)

