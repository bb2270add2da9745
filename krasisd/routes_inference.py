"""Ollama's inference routes: /api/generate and /api/chat (NDJSON streams or one object)."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator

from aiohttp import web

from krasisd import api, request_body
from krasisd.context import Daemon, daemon_of
from krasisd.runners import ModelSpec
from krasisd.streaming import collect, stream_ndjson

_COUNTERS = ("prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


def now_iso() -> str:
    """Ollama's created_at: RFC 3339 in UTC with a Z."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return stamp.replace("+00:00", "Z")


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, within KRASIS_BODY_TIMEOUT (request_body.read_json)."""
    return await request_body.read_json(request, daemon_of(request).config.body_timeout_s)


async def runner_events(daemon: Daemon, spec: ModelSpec,
                        req: api.InferenceRequest) -> AsyncIterator[dict]:
    """The runner's events; the done event carries total_duration and load_duration (ns)."""
    started_ns = time.monotonic_ns()
    load_ns = 0
    async for event in daemon.scheduler.generate(spec, req.runner_message(), req.keep_alive_s):
        load_ns = load_ns or event.get("load_duration", 0)
        if event["type"] == "done":
            event = {**event, "load_duration": load_ns,
                     "total_duration": time.monotonic_ns() - started_ns}
        yield event


def _ollama_events(daemon: Daemon, spec: ModelSpec, req: api.InferenceRequest,
                   model: str, chat: bool) -> AsyncIterator[dict]:
    def body(text: str, event: dict | None = None) -> dict:
        if not chat:  # /api/generate: Ollama's "thinking" beside "response"
            thinking = event.get("thinking") if event else None
            return {"response": text, **({"thinking": thinking} if thinking else {})}
        message = {"role": "assistant", "content": text}
        if event and event.get("thinking"):
            message["thinking"] = event["thinking"]
        if event and event.get("tool_calls"):  # whole calls, parsed by the runner
            message["tool_calls"] = [{"function": {"name": c["name"],
                                                   "arguments": c["arguments"]}}
                                     for c in event["tool_calls"]]
        return {"message": message}

    async def events() -> AsyncIterator[dict]:
        async for event in runner_events(daemon, spec, req):
            if event["text"] or event.get("thinking") or event.get("tool_calls"):
                yield {"model": model, "created_at": now_iso(), **body(event["text"], event),
                       "done": False}
            if event["type"] == "done":
                yield {"model": model, "created_at": now_iso(), **body(""), "done": True,
                       "done_reason": event["done_reason"],
                       "total_duration": event["total_duration"],
                       "load_duration": event["load_duration"],
                       **{k: event[k] for k in _COUNTERS}}

    return events()


def _merge(events: list[dict], chat: bool) -> dict:
    """One non-streamed answer: the last event with the whole text."""
    final = dict(events[-1])
    if chat:
        messages = [e["message"] for e in events]
        final["message"] = {"role": "assistant", "content": "".join(m["content"] for m in messages)}
        thinking = "".join(m.get("thinking", "") for m in messages)
        calls = [c for m in messages for c in m.get("tool_calls", ())]
        if thinking:
            final["message"]["thinking"] = thinking
        if calls:
            final["message"]["tool_calls"] = calls
    else:
        final["response"] = "".join(e["response"] for e in events)
        thinking = "".join(e.get("thinking", "") for e in events)
        if thinking:
            final["thinking"] = thinking
    return final


async def _load_or_unload(daemon: Daemon, req: api.InferenceRequest, model: str,
                          chat: bool) -> web.Response:
    """An empty prompt loads the model; with keep_alive 0 it unloads it (Ollama)."""
    spec = await daemon.catalog.spec(req.model)
    if req.keep_alive_s == 0:
        await daemon.scheduler.unload(spec.name)
        reason, load_ns = "unload", 0
    else:
        load_ns = await daemon.scheduler.load(spec, req.keep_alive_s)
        reason = "load"
    body = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return web.json_response({"model": model, "created_at": now_iso(), **body, "done": True,
                              "done_reason": reason, "load_duration": load_ns})


async def _answer(request: web.Request, req: api.InferenceRequest,
                  chat: bool) -> web.StreamResponse:
    daemon = daemon_of(request)
    model = req.model
    if req.is_empty:
        return await _load_or_unload(daemon, req, model, chat)
    spec = await daemon.catalog.spec(req.model)
    req = req.with_model_defaults(spec.system, spec.options)
    events = _ollama_events(daemon, spec, req, model, chat)
    if req.stream:
        return await stream_ndjson(request, events)
    return web.json_response(_merge(await collect(events), chat))


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate: complete a prompt."""
    return await _answer(request, api.generate_request(await read_json(request)), chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat: the assistant's next message."""
    return await _answer(request, api.chat_request(await read_json(request)), chat=True)
