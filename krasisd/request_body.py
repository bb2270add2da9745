"""Reading a request's JSON body: in bounded time, strictly parsed, and checked for values
that would break later stages.

Each failure is an :class:`~krasisd.api.ApiError` with a message for the user (400, or 408
when the body does not arrive in time); nothing here lets a library's exception through.
Refused, beyond what ``json`` itself refuses:

- ``NaN``, ``Infinity`` and numbers too large for a float (``1e400``): not JSON numbers;
- nesting deeper than :data:`MAX_DEPTH` (a request needs four levels);
- integers of more than 4300 digits (Python's limit for converting them);
- strings with a lone UTF-16 surrogate (``"\\ud800"``): not text, cannot be encoded.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import web

from krasisd.api import ApiError, as_object, bad_request

MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: web.Request, timeout_s: float) -> dict:
    """The body as a JSON object ({} when empty); the body must arrive within ``timeout_s``."""
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s "
                       "(KRASIS_BODY_TIMEOUT)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    return as_object(parse(text))


def parse(text: str) -> Any:
    """Strict JSON: ``json.loads`` plus the checks listed in this module's docstring."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON in request body: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # an integer beyond the digit limit; _refuse_constant's own
        raise bad_request(f"invalid JSON in request body: {_first_clause(exc)}") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Refuse deep nesting, non-finite numbers and lone surrogates anywhere in ``value``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
            for key in item:
                _check_text(key)
        elif isinstance(item, list):
            children = item
        else:
            _check_scalar(item)
            continue
        if children and depth >= MAX_DEPTH:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in children)


def _check_scalar(item: Any) -> None:
    if isinstance(item, str):
        _check_text(item)
    elif isinstance(item, float) and not math.isfinite(item):
        raise bad_request("invalid JSON in request body: a number is too large")


def _check_text(text: str) -> None:
    if not text.isascii():
        match = _SURROGATE.search(text)
        if match is not None:
            raise bad_request("invalid string in request body: a lone UTF-16 surrogate "
                              f"(\\u{ord(match.group()):04x}) is not a character")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep() -> ApiError:
    return bad_request(f"invalid JSON in request body: nested more than {MAX_DEPTH} levels deep")


def _first_clause(exc: ValueError) -> str:
    return str(exc).split(":")[0].split(";")[0]
