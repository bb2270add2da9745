"""Chat prompts: the model's own jinja2 chat template, rendered the way `transformers` does.

The environment matches ``transformers.utils.chat_template_utils``: an
``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter that
does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace``. Templates see ``messages``, ``add_generation_prompt``, ``tools``,
``documents``, the named special tokens (``bos_token``, ``eos_token``, ...) and any extra
keyword arguments. A model without a template gets the plain format in docs/chat.md.

A template is code from the model folder, so rendering is bounded (``RenderLimits``): every
loop iteration and every call made by the template checks a deadline, the output is counted
as it is produced, and the operations that could allocate a lot in one step (``*``, ``**``,
``%`` and ``format`` with huge widths, padding filters and methods) are refused past the
output limit. A template past a limit fails with ``ChatTemplateLimitError`` (a ValueError)
and the thread rendering it is free again.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.visitor
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from krasisd.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
FALLBACK_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
LOOP_GUARD = "__krasis_loop_guard"  # the global every template loop's iterable goes through
CONCAT_GUARD = "__krasis_concat"  # the global every `~` goes through
MAX_JSON_INDENT = 256


@dataclass(frozen=True)
class RenderLimits:
    """How long a chat template may run and how much it may write.

    The output limit is ``output_chars`` plus ``output_per_input`` times the characters of
    the messages and tools given (a template repeats its input with some markup)."""

    time_s: float = 3.0
    output_chars: int = 1 << 20
    output_per_input: int = 4


class ChatTemplateLimitError(ValueError):
    """The model's chat template ran past RenderLimits; the message says which limit."""


class _Budget:
    """The limits of the render in progress, checked by the template's loops and calls."""

    def __init__(self, limits: RenderLimits, input_chars: int):
        self.limits = limits
        self.deadline = time.monotonic() + limits.time_s
        self.max_chars = limits.output_chars + limits.output_per_input * input_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(
                f"the model's chat template ran longer than {self.limits.time_s:g} s "
                "(a loop that does not end?); it was stopped")

    def check_size(self, chars: int, what: str = "its output") -> None:
        if chars > self.max_chars:
            raise ChatTemplateLimitError(
                f"the model's chat template made {what} larger than {self.max_chars:,} "
                "characters; it was stopped")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    return budget if budget is not None else _Budget(RenderLimits(), 0)  # outside render_chat


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    limits: RenderLimits = RenderLimits(),
    **template_vars: Any,
) -> str:
    """Render ``messages`` into the prompt text the model was trained on, within ``limits``
    (ChatTemplateLimitError past them)."""
    messages = _normalize_messages(messages)
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)
    ):
        raise ValueError("tools must be a list of JSON-schema dicts")
    template = _pick_template(tokenizer, tools)
    if template is None:
        return _render_fallback(tokenizer, messages, add_generation_prompt)
    variables = {"documents": None, **tokenizer.special_tokens_map, **_plain(template_vars)}
    input_chars = len(json.dumps([messages, _plain(tools), variables], default=str))
    token = _BUDGET.set(_Budget(limits, input_chars))
    try:
        compiled = _compile(template)
        return _render_bounded(compiled, dict(
            messages=messages, tools=_plain(tools), add_generation_prompt=add_generation_prompt,
            **variables,
        ))
    except ChatTemplateLimitError:
        raise
    except MemoryError as exc:
        raise ChatTemplateLimitError("the model's chat template ran out of memory") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the model's chat template is invalid (line {exc.lineno}): {exc}") from exc
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template rejected the conversation: {exc}") from exc
    except (TypeError, KeyError, IndexError, AttributeError, ValueError, ArithmeticError,
            RecursionError) as exc:
        raise ValueError(f"the chat template failed on these messages: {exc}") from exc
    finally:
        _BUDGET.reset(token)


def _render_bounded(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """template.render(), counting the output as it is produced."""
    budget = _budget()
    pieces, chars = [], 0
    for piece in template.generate(**variables):
        chars += len(piece)
        budget.check_size(chars)
        budget.tick()
        pieces.append(piece)
    return "".join(pieces)


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
    if isinstance(indent, (int, str)) and not isinstance(indent, bool) and (
            (indent if isinstance(indent, int) else len(indent)) > MAX_JSON_INDENT):
        _budget().check_size(_budget().max_chars + 1, "an indented JSON text")
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


def _guarded(iterable: Iterable) -> Iterator:
    """Every loop of a template iterates through this: each step checks the deadline."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


# printf and str.format specs with a width or precision of 7 digits or more (a million
# characters), or taken from the arguments ("%*s", "{:{w}}")
_HUGE_PERCENT = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")
_HUGE_BRACE = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
_DYNAMIC_WIDTH = re.compile(r"%[-#0 +]*\*|%[-#0 +]*\d*\.\*|\{[^{}]*:[^{}]*\{")
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_width(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        _budget().check_size(value, "a padded string")


def _check_format(text: Any, args: Any = ()) -> None:
    """Refuse a format string that would pad past the output limit."""
    if not isinstance(text, str):
        return
    budget = _budget()
    if _HUGE_PERCENT.search(text) or _HUGE_BRACE.search(text):
        budget.check_size(budget.max_chars + 1, "a formatted string")
    if _DYNAMIC_WIDTH.search(text):
        values = args.values() if isinstance(args, Mapping) else \
            args if isinstance(args, (list, tuple)) else (args,)
        for value in values:
            _check_width(value)


def _sum_size(left: Any, right: Any) -> int:
    """The length of a + b for strings, lists and tuples."""
    if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        return len(left) + len(right)
    return 0


def _joined_size(separator: str, items: list) -> int:
    return len(separator) * max(len(items) - 1, 0) + sum(len(str(item)) for item in items)


def _concat(*parts: Any) -> str:
    """`a ~ b`: the joined text, refused past the output limit before it is made."""
    texts = [str(part) for part in parts]
    _budget().check_size(sum(len(text) for text in texts), "a joined string")
    return "".join(texts)


def _product_size(left: Any, right: Any) -> int:
    """The length of a sequence repeated by *, or the bits of an integer product."""
    if isinstance(left, int) and isinstance(right, int):
        return (left.bit_length() + right.bit_length()) // 8
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            return len(seq) * max(count, 0)
    return 0


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus RenderLimits: calls, loops and costly operators counted."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        budget = _budget()
        budget.tick()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (_guarded(args[0]), *args[1:])
        elif isinstance(getattr(__obj, "__self__", None), str):
            args = _check_str_method(__obj.__name__, __obj.__self__, args, budget)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator_name: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator_name == "*":
            budget.check_size(_product_size(left, right), "a repeated value")
        elif operator_name == "+":
            budget.check_size(_sum_size(left, right), "a joined value")
        elif operator_name == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right > 0:
            budget.check_size(right * left.bit_length() // 8, "a power")
        elif operator_name == "%":
            _check_format(left, right)
        return super().call_binop(context, operator_name, left, right)

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def bounded(*args, **kwargs):
            _check_format(text, [*args, *kwargs.values(), *(
                args[0].values() if args and isinstance(args[0], Mapping) else ())])
            return wrapped(*args, **kwargs)
        return functools.update_wrapper(bounded, wrapped)


def _check_str_method(name: str, text: str, args: tuple, budget: _Budget) -> tuple:
    """Refuse a str method call whose result would pass the output limit; the arguments
    to call it with (an iterable given to join is read once, here)."""
    if name in _PADDING_METHODS and args:
        _check_width(args[0])
    elif name == "join" and args:
        items = list(args[0])
        budget.check_size(_joined_size(text, items), "a joined string")
        return (items, *args[1:])
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        budget.check_size(_replaced_size(text, *args[:2]), "a replaced string")
    return args


def _replaced_size(text: str, old: str, new: str) -> int:
    """The largest result of text.replace(old, new)."""
    count = len(text) + 1 if not old else len(text) // len(old)
    return len(text) + count * max(len(new) - len(old), 0)


@jinja2.pass_eval_context
def _join_filter(eval_ctx, value, d="", attribute=None):
    items = list(value)
    if attribute is None:
        _budget().check_size(_joined_size(str(d), items), "a joined string")
    return jinja2.filters.do_join(eval_ctx, items, d, attribute)


@jinja2.pass_eval_context
def _replace_filter(eval_ctx, s, old, new, count=None):
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        _budget().check_size(_replaced_size(s, old, new), "a replaced string")
    return jinja2.filters.do_replace(eval_ctx, s, old, new, count)


def _counted_filter(name: str):
    """batch and slice make as many lists (or fill values) as their count says."""
    original = jinja2.filters.FILTERS[name]
    first = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0

    def bounded(*args, **kwargs):
        count = args[first + 1] if len(args) > first + 1 else \
            kwargs.get("linecount", kwargs.get("slices"))
        _check_width(count)
        return original(*args, **kwargs)
    return functools.update_wrapper(bounded, original)


def _padding_filter(name: str):
    original = jinja2.filters.FILTERS[name]

    def bounded(value, *args, **kwargs):
        _check_width(args[0] if args else kwargs.get("width"))
        return original(value, *args, **kwargs)
    return functools.update_wrapper(bounded, original)


def _format_filter(value, *args, **kwargs):
    _check_format(value, [*args, *kwargs.values()])
    return jinja2.filters.do_format(value, *args, **kwargs)


class _Guards(jinja2.visitor.NodeTransformer):
    """Every ``{% for %}`` iterates through LOOP_GUARD (recursive calls of a loop are
    _BoundedEnvironment.call's), every ``~`` joins through CONCAT_GUARD."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(LOOP_GUARD, "load"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(CONCAT_GUARD, "load"), node.nodes, [], None, None,
                          lineno=node.lineno)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters["center"] = _padding_filter("center")
    env.filters["indent"] = _padding_filter("indent")
    env.filters["format"] = _format_filter
    env.filters["join"] = _join_filter
    env.filters["replace"] = _replace_filter
    env.filters["batch"] = _counted_filter("batch")
    env.filters["slice"] = _counted_filter("slice")
    env.globals.pop("lipsum", None)  # writes as much text as asked for
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals[LOOP_GUARD] = _guarded
    env.globals[CONCAT_GUARD] = _concat
    code = env.compile(_Guards().visit(env.parse(template)))
    return env.template_class.from_code(env, code, env.make_globals(None), None)
