"""Chat prompts: the model's own jinja2 chat template, rendered the way `transformers` does.

The environment matches ``transformers.utils.chat_template_utils``: an
``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter that
does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace``. Templates see ``messages``, ``add_generation_prompt``, ``tools``,
``documents``, the named special tokens (``bos_token``, ``eos_token``, ...) and any extra
keyword arguments. A model without a template gets the plain format in docs/chat.md.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from krasisd.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
FALLBACK_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **template_vars: Any,
) -> str:
    """Render ``messages`` into the prompt text the model was trained on."""
    messages = _normalize_messages(messages)
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)
    ):
        raise ValueError("tools must be a list of JSON-schema dicts")
    template = _pick_template(tokenizer, tools)
    if template is None:
        return _render_fallback(tokenizer, messages, add_generation_prompt)
    variables = {"documents": None, **tokenizer.special_tokens_map, **_plain(template_vars)}
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=messages, tools=_plain(tools), add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the model's chat template is invalid (line {exc.lineno}): {exc}") from exc
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template rejected the conversation: {exc}") from exc
    except (TypeError, KeyError, IndexError, AttributeError, ValueError, ArithmeticError,
            RecursionError) as exc:
        raise ValueError(f"the chat template failed on these messages: {exc}") from exc


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **template_vars: Any,
) -> list[int]:
    """Token ids of the rendered chat; the rendered text carries its own special tokens."""
    text = render_chat(tokenizer, messages, add_generation_prompt, **template_vars)
    return tokenizer.encode(text, add_special_tokens=False)


def _pick_template(tokenizer: Tokenizer, tools: list | None) -> str | None:
    """Like transformers: "tool_use" when tools are given and it exists, else "default"."""
    templates = tokenizer.chat_templates
    if not templates:
        return None
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError(
        "the model has several chat templates and none is named 'default': "
        f"{sorted(templates)}"
    )


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with a string role; keys whose value is None are dropped (as transformers)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} has no string 'role'")
        plain = {_plain(k): _plain(v) for k, v in message.items() if v is not None}
        normalized.append(_alias_reasoning(plain))
    return normalized


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the sandbox; anything else becomes a "<type>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) lose their extra methods
        if isinstance(value, base):
            return base(value) if base is bool else getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Fill "reasoning_content" (and "thinking") from whichever reasoning field is set."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _render_fallback(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The documented plain format for models without a chat template (docs/chat.md)."""
    parts = [tokenizer.bos_token or ""] if tokenizer.adds_bos_token else []
    for message in messages:
        role = FALLBACK_ROLE_NAMES.get(message["role"], message["role"].capitalize())
        parts.append(f"{role}: {_content_text(message.get('content', ''))}\n\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def _content_text(content: Any) -> str:
    """A message's text: a string, or the "text" parts of an OpenAI-style content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError(f"message content must be a string or a list of parts, got {content!r}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` in templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attributes: {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)
