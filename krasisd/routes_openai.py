"""OpenAI compatibility: /v1/models, /v1/chat/completions, /v1/completions (JSON or SSE).

Logprobs: the engine reports the log-probability of each sampled token, so
``top_logprobs`` lists only that token (never alternatives it did not compute).
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import AsyncIterator

from aiohttp import web

from krasisd import api
from krasisd.client_errors import error_message
from krasisd.context import daemon_of
from krasisd.routes_inference import read_json, runner_events
from krasisd.streaming import collect, stream_sse
from krasisd.tools import ToolCall

_FINISH = {"stop": "stop", "length": "length", "cancel": "stop"}


def _finish(done: dict, called: bool) -> str:
    """finish_reason: "tool_calls" when the answer ended with tool calls."""
    finish = _FINISH.get(done["done_reason"], "stop")
    return "tool_calls" if called and finish == "stop" else finish


def _tool_calls(event: dict, first_index: int = 0, delta: bool = False) -> list[dict]:
    """The runner's parsed calls of one event in OpenAI's shape (streaming: with index)."""
    calls = [ToolCall(c["name"], c["arguments"], c["id"]) for c in event.get("tool_calls", ())]
    return [c.openai(first_index + i if delta else None) for i, c in enumerate(calls)]


def _usage(done: dict) -> dict:
    """OpenAI's usage; ``cached_tokens``: prompt tokens the runner's prefix cache supplied."""
    prompt, completion = done["prompt_eval_count"], done["eval_count"]
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": done.get("prompt_eval_cached_count", 0)}}


def _sse_error(exc: BaseException) -> dict:
    return {"error": {"message": error_message(exc), "type": "api_error", "param": None,
                      "code": None}}


async def models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    items = await daemon_of(request).catalog.list()
    return web.json_response({"object": "list", "data": [_model_object(m) for m in items]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    name = api.model_name({"model": request.match_info["model"]})
    spec = await daemon_of(request).catalog.spec(name)
    return web.json_response(_model_object({"name": spec.name}))


def _model_object(item: dict) -> dict:
    return {"id": item.get("name") or item.get("model"), "object": "model",
            "created": _created(item.get("modified_at")), "owned_by": "krasis"}


def _created(stamp) -> int:
    try:
        return int(datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


# ------------------------------------------------------------------ chat

async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    req = api.openai_chat_request(await read_json(request))
    daemon = daemon_of(request)
    spec = await daemon.catalog.spec(req.inference.model)
    req.inference = req.inference.with_model_defaults(spec.system, spec.options)
    meta = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()),
            "model": req.inference.model, "system_fingerprint": "krasis"}
    events = runner_events(daemon, spec, req.inference)
    if req.inference.stream:
        return await stream_sse(request, _chat_chunks(events, meta, req), _sse_error)
    collected = await collect(events)
    done, text, tokens = _gathered(collected)
    message = {"role": "assistant", "content": text}
    calls = [c for e in collected for c in _tool_calls(e)]
    if calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": calls}
    thinking = "".join(e.get("thinking", "") for e in collected)
    if thinking:
        message["reasoning_content"] = thinking
    choice = {"index": 0, "message": message, "finish_reason": _finish(done, bool(calls)),
              "logprobs": _chat_logprobs(tokens) if req.inference.logprobs else None}
    return web.json_response({**meta, "object": "chat.completion", "choices": [choice],
                              "usage": _usage(done)})


async def _chat_chunks(events: AsyncIterator[dict], meta: dict,
                       req: api.OpenAIRequest) -> AsyncIterator[dict]:
    base = {**meta, "object": "chat.completion.chunk"}
    usage = {"usage": None} if req.include_usage else {}
    role_sent, calls_sent = False, 0
    async for event in events:
        calls = _tool_calls(event, calls_sent, delta=True)
        if event["text"] or not role_sent or calls or event.get("thinking"):
            delta = {"content": event["text"]}
            if not role_sent:
                delta["role"] = "assistant"
                role_sent = True
            if event.get("thinking"):
                delta["reasoning_content"] = event["thinking"]
            if calls:
                delta["tool_calls"] = calls
                calls_sent += len(calls)
            choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            if req.inference.logprobs and event["token_id"] is not None:
                choice["logprobs"] = _chat_logprobs([event])
            yield {**base, "choices": [choice], **usage}
        if event["type"] == "done":
            finish = _finish(event, calls_sent > 0)
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish,
                                        "logprobs": None}], **usage}
            if req.include_usage:
                yield {**base, "choices": [], "usage": _usage(event)}


def _chat_logprobs(tokens: list[dict]) -> dict:
    content = []
    for t in tokens:
        token = {"token": t["text"], "logprob": t["logprob"],
                 "bytes": list(t["text"].encode())}
        content.append({**token, "top_logprobs": [token]})
    return {"content": content}


async def _gather(events: AsyncIterator[dict]) -> tuple[dict, str, list[dict]]:
    """(done event, whole text, token events) of a non-streamed request."""
    return _gathered(await collect(events))


def _gathered(collected: list[dict]) -> tuple[dict, str, list[dict]]:
    tokens = [e for e in collected if e["token_id"] is not None and e["logprob"] is not None]
    return collected[-1], "".join(e["text"] for e in collected), tokens


# ------------------------------------------------------------------ completions

async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (legacy text completions, with logprobs)."""
    req = api.openai_completion_request(await read_json(request))
    daemon = daemon_of(request)
    spec = await daemon.catalog.spec(req.inference.model)
    req.inference = req.inference.with_model_defaults(spec.system, spec.options)
    meta = {"id": "cmpl-" + secrets.token_hex(12), "created": int(time.time()),
            "model": req.inference.model, "system_fingerprint": "krasis"}
    events = runner_events(daemon, spec, req.inference)
    if req.inference.stream:
        return await stream_sse(request, _completion_chunks(events, meta, req), _sse_error)
    done, text, tokens = await _gather(events)
    choice = {"index": 0, "text": text, "finish_reason": _FINISH.get(done["done_reason"], "stop"),
              "logprobs": _completion_logprobs(tokens, 0) if req.inference.logprobs else None}
    return web.json_response({**meta, "object": "text_completion", "choices": [choice],
                              "usage": _usage(done)})


async def _completion_chunks(events: AsyncIterator[dict], meta: dict,
                             req: api.OpenAIRequest) -> AsyncIterator[dict]:
    base = {**meta, "object": "text_completion"}
    usage = {"usage": None} if req.include_usage else {}
    offset = 0
    async for event in events:
        if event["text"] or event["type"] != "done":
            logprobs = None
            if req.inference.logprobs and event["token_id"] is not None:
                logprobs = _completion_logprobs([event], offset)
            offset += len(event["text"])
            yield {**base, "choices": [{"index": 0, "text": event["text"], "logprobs": logprobs,
                                        "finish_reason": None}], **usage}
        if event["type"] == "done":
            finish = _FINISH.get(event["done_reason"], "stop")
            yield {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": finish}], **usage}
            if req.include_usage:
                yield {**base, "choices": [], "usage": _usage(event)}


def _completion_logprobs(tokens: list[dict], start_offset: int) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, offset = [], start_offset
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {"tokens": [t["text"] for t in tokens],
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{t["text"]: t["logprob"]} for t in tokens],
            "text_offset": offsets}
