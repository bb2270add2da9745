"""The HTTP API as a contract: every request field, parsed and checked in one place.

Request shapes follow Ollama's ``api/types.go`` (``/api/*``) and OpenAI's API (``/v1/*``).
A field the client did not send is ``None`` ("unset"), so ``"stream": false`` and no
``stream`` at all stay distinguishable. Every check raises :class:`ApiError` with the
HTTP status and a message for the user; ``docs/api.md`` lists the responses.

Requests of both families are reduced to one :class:`InferenceRequest`, which is what the
scheduler hands to a runner.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from krasisd import grammars, tools
from krasisd.config import parse_keep_alive_s
from krasisd.engine.options import SamplingOptions

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP status, the message is for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def shown(value: Any, limit: int = 60) -> str:
    """A client's value for an error message: its repr, cut to ``limit`` characters."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# Integers the API passes on are 64-bit (Ollama's Go ints); num_ctx, the context window in
# tokens, is refused above 2^31 (the runner also caps it at the model's own maximum).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NUM_CTX = 2**31


# ---------------------------------------------------------------- field readers

def _field(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[name] if present and of one of ``kinds`` (never bool for numbers), else None."""
    value = body.get(name)
    if value is None:
        return None
    is_bool_for_number = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or is_bool_for_number:
        raise bad_request(f"invalid value for {name!r}: expected {what}, "
                          f"got {type(value).__name__}")
    return value


def _str(body: dict, name: str) -> str | None:
    return _field(body, name, (str,), "a string")


def _bool(body: dict, name: str) -> bool | None:
    return _field(body, name, (bool,), "true or false")


def _number(body: dict, name: str) -> float | None:
    value = _field(body, name, (int, float), "a number")
    if value is None:
        return None
    if isinstance(value, int):
        value = _within(name, value, INT64_MIN, INT64_MAX)
    if not math.isfinite(value):
        raise bad_request(f"invalid value for {name!r}: expected a finite number, got {value}")
    return float(value)


def _int(body: dict, name: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int | None:
    value = _field(body, name, (int, float), "an integer")
    if value is None:
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise bad_request(f"invalid value for {name!r}: expected an integer, got {value}")
    return _within(name, int(value), low, high)


def _within(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise bad_request(f"invalid value for {name!r}: {shown(value, 24)} is out of range "
                          f"({low} to {high})")
    return value


def as_object(body: Any) -> dict:
    """The parsed JSON body, which must be an object."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


# Names: letters, digits, '.', '_', '-', one optional '/' (org/repo) and ':tag'.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?"
                      r"(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")


def model_name(body: dict, required: bool = True) -> str | None:
    """'model' (or Ollama's older 'name'), checked so that it can never be a file path."""
    name = _str(body, "model") or _str(body, "name")
    if not name:
        if required:
            raise bad_request("missing field 'model'")
        return None
    if ".." in name or not _NAME_RE.fullmatch(name):  # fullmatch: no trailing newline either
        raise bad_request(f"invalid model name {shown(name)}: use letters, digits, '.', '_', "
                          "'-', an optional 'org/' prefix and ':tag'")
    return name


def keep_alive_s(body: dict) -> float | None:
    """keep_alive: seconds or a duration string; negative = forever; None when unset.

    Beyond KEEP_ALIVE_FOREVER_AFTER_S (100 years) is forever too, as Ollama treats huge
    values (``1e308``, ``"99999999999h"``)."""
    value = body.get("keep_alive")
    if value is None:
        return None
    try:
        return parse_keep_alive_s(value)
    except ValueError:
        raise bad_request(f"invalid keep_alive {shown(value)}: use seconds or a duration such "
                          "as '5m' or '1h30m' (negative: forever)") from None


# ---------------------------------------------------------------- options

_FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                  "frequency_penalty")
_INT_OPTIONS = ("top_k", "repeat_last_n", "seed", "num_predict", "num_ctx")
_INT_RANGES = {"num_ctx": (1, MAX_NUM_CTX)}
# Bounds that keep the sampler's float32 arithmetic finite: a temperature or repeat_penalty
# of 1e-308, or a penalty of -1e308, made every logit NaN. 0 stays allowed (greedy).
_FLOAT_RANGES = {"temperature": (1e-6, 1e6), "repeat_penalty": (1e-6, 1e6),
                 "presence_penalty": (-1e6, 1e6), "frequency_penalty": (-1e6, 1e6)}
# Ollama options that krasis accepts and does not use (the engine decides these itself).
IGNORED_OPTIONS = frozenset({
    "num_keep", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only",
    "use_mmap", "use_mlock", "num_thread", "f16_kv", "logits_all", "embedding_only",
})


def option_values(raw: Any, what: str = "options") -> dict:
    """The options krasis uses from Ollama's ``options`` object, checked: a known key with a
    bad value is a 400 naming it. Unknown keys are ignored, as Ollama does (its own example
    sends ``draft_num_predict``), with one INFO log line per request naming them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_request(f"invalid value for {what!r}: expected an object")
    values: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if value is None or key in IGNORED_OPTIONS:
            continue
        if key in _FLOAT_OPTIONS:
            values[key] = _bounded_number(raw, key)
        elif key in _INT_OPTIONS:
            values[key] = _int(raw, key, *_INT_RANGES.get(key, (INT64_MIN, INT64_MAX)))
        elif key == "stop":
            values["stop"] = stop_list(value)
        else:
            unknown.append(shown(key, 40))
    if unknown:
        log.info("ignoring unknown options", extra={"field": what, "options": unknown})
    return values


def make_options(*layers: dict) -> SamplingOptions:
    """SamplingOptions from layers of option values, later layers winning."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    try:
        return SamplingOptions(**values)
    except ValueError as exc:
        raise bad_request(f"invalid options: {exc}") from None


def sampling_options(raw: Any, base: dict | None = None) -> SamplingOptions:
    """Ollama's ``options`` object -> SamplingOptions (unknown keys logged and ignored)."""
    return make_options(base or {}, option_values(raw))


def _bounded_number(raw: dict, key: str) -> float | None:
    value = _number(raw, key)
    low, high = _FLOAT_RANGES.get(key, (-math.inf, math.inf))
    if value is not None and value != 0 and not low <= value <= high:
        raise bad_request(f"invalid value for {key!r}: {value:g} is out of range "
                          f"({low:g} to {high:g}, or 0)")
    return value


def stop_list(value: Any) -> list[str]:
    """'stop' as a string or a list of strings."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise bad_request("invalid value for 'stop': expected a string or a list of strings")


def json_format(body: dict) -> str | dict | None:
    """Ollama's 'format': "json" (one JSON object), a JSON schema object, or "" for none.
    A schema is compiled here (krasisd.grammars) so a bad one is a 400 before any runner."""
    value = body.get("format")
    try:
        grammars.format_grammar(value)
    except ValueError as exc:
        raise bad_request(f"invalid value for 'format': {exc}") from None
    return None if value in (None, "") else value


def request_tools(body: dict, openai: bool = False) -> list[dict] | None:
    """'tools' (the same shape on /api/chat and /v1/chat/completions); on /v1, 'tool_choice'
    "none" drops them and anything but "auto" or "none" is a 400."""
    try:
        listed = tools.request_tools(body.get("tools"))
        choice = tools.request_tool_choice(body.get("tool_choice")) if openai else "auto"
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return None if choice == "none" else listed


# ---------------------------------------------------------------- what a runner is asked

@dataclass
class InferenceRequest:
    """One generation, as the scheduler and runner see it (either API family)."""

    model: str
    options: SamplingOptions
    prompt: str | None = None  # /api/generate, /v1/completions
    messages: list[dict] | None = None  # /api/chat, /v1/chat/completions
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    format: str | dict | None = None  # "json" or a JSON schema
    tools: list[dict] | None = None  # passed to the chat template; the answer is parsed
    think: bool | str | None = None  # Ollama's think (or OpenAI's reasoning_effort); None: unset
    stream: bool = True
    keep_alive_s: float | None = None
    logprobs: bool = False
    # the option values the client set, and the API's defaults under them (OpenAI's differ
    # from Ollama's): a model's own defaults go between the two (with_model_defaults)
    client_options: dict = field(default_factory=dict)
    base_options: dict = field(default_factory=dict)

    def with_model_defaults(self, system: str | None, options: dict | None) -> InferenceRequest:
        """The request with its model's defaults (Ollama's SYSTEM and PARAMETER, set by
        /api/create): the model's options win over the API's defaults and lose to the
        client's own; its system message is used where the request has none (a generate
        without ``system``, a chat without a system message; never a raw prompt or a
        fill-in-the-middle ``suffix``, which Ollama renders without one)."""
        changes: dict[str, Any] = {}
        if options:
            changes["options"] = make_options(self.base_options, options, self.client_options)
        if system and not self.raw and not self.suffix:
            if self.messages is not None:
                if self.messages and not any(m["role"] == "system" for m in self.messages):
                    changes["messages"] = [{"role": "system", "content": system},
                                           *self.messages]
            elif not self.system:
                changes["system"] = system
        return dataclasses.replace(self, **changes) if changes else self

    def runner_message(self) -> dict:
        """The JSON-ready request sent to the runner process."""
        return {"prompt": self.prompt, "messages": self.messages, "system": self.system,
                "suffix": self.suffix, "raw": self.raw, "format": self.format,
                "tools": self.tools, "think": self.think, "logprobs": self.logprobs,
                "options": dataclasses.asdict(self.options)}

    @property
    def is_empty(self) -> bool:
        """No prompt and no messages: Ollama's way to load (or, keep_alive 0, unload)."""
        return not self.prompt and not self.messages and not self.suffix


_ROLES = ("system", "user", "assistant", "tool")


def chat_messages(value: Any, openai: bool = False) -> list[dict]:
    """messages: a list of {role, content}; OpenAI content parts are joined as text."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("invalid value for 'messages': expected a list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = message.get("role")
        if openai and role == "developer":
            role = "system"
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(_ROLES)}")
        if message.get("images"):
            raise bad_request("images are not supported by krasis models")
        out.append({"role": role, "content": _content_text(message.get("content"), i),
                    **_tool_fields(message, role, i)})
    return out


def _tool_fields(message: dict, role: str, index: int) -> dict:
    """An assistant's tool calls (arguments as objects, as templates read them) and a tool
    result's call id and function name."""
    if role == "assistant" and message.get("tool_calls"):
        try:
            return {"tool_calls": tools.template_tool_calls(message["tool_calls"])}
        except ValueError as exc:
            raise bad_request(f"messages[{index}].{exc}") from None
    if role == "tool":
        return {k: message[k] for k in ("tool_call_id", "name", "tool_name")
                if isinstance(message.get(k), str)}
    return {}


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{index}].content must be a string")


def generate_request(body: dict) -> InferenceRequest:
    """POST /api/generate."""
    if body.get("images"):
        raise bad_request("images are not supported by krasis models")
    options = option_values(body.get("options"))
    return InferenceRequest(
        model=model_name(body), options=make_options(options), client_options=options,
        prompt=_str(body, "prompt"), system=_str(body, "system"), suffix=_str(body, "suffix"),
        raw=bool(_bool(body, "raw")), format=json_format(body), think=think_value(body),
        stream=_bool(body, "stream") is not False, keep_alive_s=keep_alive_s(body))


THINK_LEVELS = ("low", "medium", "high")


def think_value(body: dict, name: str = "think") -> bool | str | None:
    """Ollama's ``think`` (true, false, or a level for models that take one, as gpt-oss) or
    OpenAI's ``reasoning_effort`` (a level); None when unset."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and name == "think":
        return value
    if isinstance(value, str) and value in THINK_LEVELS:
        return value
    expected = "true, false or " if name == "think" else ""
    raise bad_request(f"invalid value for {name!r}: expected {expected}one of "
                      f"{', '.join(THINK_LEVELS)}")


def chat_request(body: dict) -> InferenceRequest:
    """POST /api/chat."""
    options = option_values(body.get("options"))
    return InferenceRequest(
        model=model_name(body), options=make_options(options), client_options=options,
        messages=chat_messages(body.get("messages")), format=json_format(body),
        tools=request_tools(body), think=think_value(body),
        stream=_bool(body, "stream") is not False, keep_alive_s=keep_alive_s(body))


# ---------------------------------------------------------------- OpenAI /v1

# OpenAI's documented defaults differ from Ollama's: temperature 1, top_p 1, no penalty.
_OPENAI_BASE = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0}


def _openai_options(body: dict, max_tokens_default: int = -1) -> dict:
    """InferenceRequest's option fields: OpenAI's defaults under what the client set (a
    max_tokens the client did not send is a default too, which a model's own wins over)."""
    raw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed"):
        if body.get(name) is not None:
            raw[name] = body[name]
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    base = dict(_OPENAI_BASE)
    if max_tokens is None:
        base["num_predict"] = max_tokens_default
    else:
        raw["num_predict"] = max_tokens
    if body.get("stop") is not None:
        raw["stop"] = body["stop"]
    n = _int(body, "n")
    if n is not None and n != 1:
        raise bad_request(f"only n=1 is supported (one choice per request), got n={n}")
    client = option_values(raw)
    return {"options": make_options(base, client), "client_options": client,
            "base_options": base}


def _openai_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("invalid value for 'stream_options': expected an object")
    include_usage = bool(_bool(options or {}, "include_usage"))
    return stream, include_usage


def _response_format(body: dict) -> str | dict | None:
    """response_format: text, json_object (= format "json") or json_schema (its schema)."""
    value = body.get("response_format")
    try:
        grammars.response_format_grammar(value)
    except ValueError as exc:
        raise bad_request(f"invalid value for 'response_format': {exc}") from None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return value["json_schema"]["schema"]
    return None


@dataclass
class OpenAIRequest:
    """An OpenAI request: the inference plus how to shape the answer."""

    inference: InferenceRequest
    include_usage: bool = False
    top_logprobs: int = 0


def openai_chat_request(body: dict) -> OpenAIRequest:
    """POST /v1/chat/completions."""
    stream, include_usage = _openai_stream(body)
    messages = chat_messages(body.get("messages"), openai=True)
    if not messages:
        raise bad_request("'messages' must not be empty")
    inference = InferenceRequest(
        model=model_name(body), **_openai_options(body), messages=messages,
        format=_response_format(body), tools=request_tools(body, openai=True), stream=stream,
        think=think_value(body, "reasoning_effort"), logprobs=bool(_bool(body, "logprobs")))
    return OpenAIRequest(inference, include_usage)


def openai_completion_request(body: dict) -> OpenAIRequest:
    """POST /v1/completions; max_tokens defaults to 16 as in OpenAI's API."""
    stream, include_usage = _openai_stream(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (lists of prompts are not supported)")
    if _bool(body, "echo"):
        raise bad_request("'echo' is not supported")
    logprobs = _int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise bad_request("'logprobs' must be between 0 and 5")
    inference = InferenceRequest(
        model=model_name(body), **_openai_options(body, max_tokens_default=16),
        prompt=prompt, suffix=_str(body, "suffix"), raw=True, stream=stream,
        logprobs=logprobs is not None)
    return OpenAIRequest(inference, include_usage, top_logprobs=logprobs or 0)


# ---------------------------------------------------------------- model management

@dataclass
class PullRequest:
    model: str
    insecure: bool = False
    stream: bool = True


def pull_request(body: dict) -> PullRequest:
    """POST /api/pull."""
    return PullRequest(model_name(body), bool(_bool(body, "insecure")),
                       _bool(body, "stream") is not False)


@dataclass
class CreateRequest:
    """A create from a folder (``path``) or from a model (``source``, Ollama's derived
    model). ``system`` and ``options`` None: unset (a derived model keeps its source's)."""

    model: str
    path: str | None = None
    source: str | None = None
    system: str | None = None
    options: dict | None = None
    stream: bool = True
    files: dict[str, str] | None = None  # {file name: blob digest}, uploaded to /api/blobs


# Ollama's create fields krasis has no use for: refused, never dropped silently.
_CREATE_UNSUPPORTED = {
    "adapters": "krasis does not apply adapters",
    "messages": "krasis does not store messages with a model",
    "quantize": "krasis quantizes when it builds its caches (KRASIS_QUANT)",
    "license": "krasis does not store a license with a model",
    "modelfile": "send 'path' (or 'from'), 'system' and 'parameters' as JSON fields",
}


def create_request(body: dict) -> CreateRequest:
    """POST /api/create: {"model", "path"} (or "from" with an absolute folder), or "from"
    a model's name; optional "system" and "parameters" (the model's default options)."""
    name = model_name(body)
    for key, why in _CREATE_UNSUPPORTED.items():
        if body.get(key):
            raise bad_request(f"'{key}' is not supported: {why}")
    if body.get("template"):
        raise bad_request("'template' is not supported: krasis renders prompts with the "
                          "model's own chat template (Jinja, from its tokenizer_config.json), "
                          "not an Ollama Go template")
    path, source = _str(body, "path"), None
    files = body.get("files")
    if files:
        if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise bad_request("invalid value for 'files': expected an object of file names "
                              "and blob digests")
        if path or body.get("from"):
            raise bad_request("give one of 'files' (uploaded blobs), 'path' or 'from'")
    elif not path:
        origin = _str(body, "from")
        if not origin:
            raise bad_request("missing field 'path': the local folder to create the model "
                              "from (or 'from': a folder or a model's name)")
        if origin.startswith("/"):
            path = origin
        else:
            try:
                source = model_name({"model": origin})
            except ApiError:
                raise bad_request(f"invalid value for 'from': {shown(origin)} is neither an "
                                  "absolute folder path nor a model's name") from None
    if path is not None and not path.startswith("/"):
        raise bad_request("'path' must be an absolute path to a folder on the daemon's machine")
    parameters = body.get("parameters")
    options = None if parameters is None else option_values(parameters, "parameters")
    if options:
        make_options(options)  # a combination SamplingOptions refuses is a 400 now
    return CreateRequest(name, path, source, _str(body, "system"), options,
                         _bool(body, "stream") is not False, files or None)


@dataclass
class CopyRequest:
    source: str
    destination: str


def copy_request(body: dict) -> CopyRequest:
    """POST /api/copy: {"source", "destination"}, two model names."""
    names = []
    for key in ("source", "destination"):
        if not _str(body, key):
            raise bad_request(f"missing field {key!r}")
        names.append(model_name({"model": body[key]}))
    return CopyRequest(*names)
