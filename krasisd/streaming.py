"""The one place that writes streamed responses: NDJSON (Ollama) and SSE (OpenAI).

Both helpers take the first event before sending headers, so an error that happens before
anything was produced (unknown model, full queue, load failure) still gets its own HTTP
status. Once streaming has started, an error becomes the last event of the stream:
``{"error": "..."}`` as a line, or ``data: {"error": {...}}`` for SSE.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from krasisd.client_errors import error_message

log = logging.getLogger(__name__)

_NDJSON = "application/x-ndjson"


async def _first(events: AsyncIterator[Any]) -> tuple[bool, Any]:
    try:
        return True, await events.__anext__()
    except StopAsyncIteration:
        return False, None


async def stream_ndjson(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    """Send each event as one JSON line; an error mid-stream as a final {"error": ...} line."""
    async with contextlib.aclosing(events):
        has_first, first = await _first(events)
        response = web.StreamResponse(headers={"Content-Type": _NDJSON})
        await response.prepare(request)
        if has_first:
            await _write_all(response, first, events, _ndjson_line,
                             lambda exc: _ndjson_line({"error": error_message(exc)}))
        await response.write_eof()
        return response


async def stream_sse(request: web.Request, events: AsyncIterator[dict],
                     error_event: Callable[[BaseException], dict]) -> web.StreamResponse:
    """Send each event as ``data: {...}``, then ``data: [DONE]``; errors as a data event."""
    async with contextlib.aclosing(events):
        has_first, first = await _first(events)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        failed = False
        if has_first:
            failed = not await _write_all(response, first, events, _sse_event,
                                          lambda exc: _sse_event(error_event(exc)))
        if not failed:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _write_all(response, first, events, encode, encode_error) -> bool:
    """Write events until the end; True if no error occurred mid-stream."""
    await response.write(encode(first))
    try:
        async for event in events:
            await response.write(encode(event))
    except (ConnectionError, OSError):
        raise  # the client went away: nothing more can be sent
    except Exception as exc:  # noqa: BLE001 - any failure ends the stream with an error event
        log.warning("stream ended with an error", extra={"error": str(exc) or repr(exc)})
        await response.write(encode_error(exc))
        return False
    return True


def _ndjson_line(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


def _sse_event(event: dict) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


async def collect(events: AsyncIterator[dict]) -> list[dict]:
    """All events of a non-streaming request (errors propagate to the error mapping)."""
    async with contextlib.aclosing(events):
        return [event async for event in events]
