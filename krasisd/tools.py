"""Tool calls in generated text: each model family's format as data, and one streaming
splitter that turns the text, as tokens arrive, into plain content and complete tool calls.

A :class:`ToolFormat` names the markers a family writes around a call (``call_starts`` /
``call_ends``), regular expressions that read the name and arguments from the text between
them, how the arguments are written (a JSON object; Hermes' JSON with the name inside; GLM's
``<arg_key>``/``<arg_value>`` pairs), wrappers around a group of calls (``sections``),
framing markers that are not content (gpt-oss' harmony headers) and reasoning spans
(harmony's analysis channel). The families, as the models' own chat templates and published
parsers write them:

- hermes (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``
- deepseek_v3 (V3, R1): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N\\n
  ```json\\n{...}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>``; V3.1's
  ``<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` is read too
- glm45 (GLM-4.5 to 4.7): ``<tool_call>N\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>``
  (the separators may be absent)
- qwen3_coder: ``<tool_call>\\n<function=N>\\n<parameter=k>\\nv\\n</parameter>\\n</function>\\n</tool_call>``
- harmony (gpt-oss): ``<|channel|>commentary to=functions.N <|constrain|>json<|message|>{...}<|call|>``
  (``<|call|>`` is an end-of-sequence token, so an open call at the end is read as ended)
- kimi_k2: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.N:0
  <|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>``

Streaming (:class:`ToolCallStream`): text is emitted as content at once, except the shortest
tail that could still be the start of a marker; a call's text is held until its end marker and
then comes out as one :class:`ToolCall`. A call that cannot be read (bad JSON, no name) comes
out as content, unchanged, so nothing the model wrote is lost. Whitespace after a call is held
until more content follows (models put newlines between and after calls).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """Text between ``start`` and the first of ``ends``."""

    start: str
    ends: tuple[str, ...]


@dataclass(frozen=True)
class ToolFormat:
    family: str
    call_starts: tuple[str, ...]
    call_ends: tuple[str, ...]
    # tried in order on the text between the markers; groups "name", "args", optional "id"
    call_patterns: tuple[re.Pattern, ...]
    arguments: str = "json"  # "json", "json_named" (name inside the JSON) or "pairs"
    pair_pattern: re.Pattern | None = None  # "pairs": groups (key, value)
    sections: tuple[Span, ...] = ()  # wrappers around calls; other whitespace inside is dropped
    framing: tuple[str, ...] = ()  # markers that are never content
    reasoning: tuple[Span, ...] = ()  # spans that are thinking, not content

    def markers(self) -> tuple[str, ...]:
        spans = (*self.sections, *self.reasoning)
        return (*self.call_starts, *self.call_ends, *self.framing,
                *(s.start for s in spans), *(e for s in spans for e in s.ends))


_S = re.DOTALL
FORMATS: dict[str, ToolFormat] = {f.family: f for f in (
    ToolFormat(
        "hermes", ("<tool_call>",), ("</tool_call>",),
        (re.compile(r"\s*(?P<args>\{.*\})\s*", _S),), arguments="json_named"),
    ToolFormat(
        "deepseek_v3", ("<｜tool▁call▁begin｜>",), ("<｜tool▁call▁end｜>",),
        (re.compile(r"function<｜tool▁sep｜>(?P<name>[^\n]+)\n```(?:json)?\n(?P<args>.*?)\n?```\s*", _S),
         re.compile(r"(?P<name>[^\n<]+?)<｜tool▁sep｜>(?P<args>.*)", _S)),
        sections=(Span("<｜tool▁calls▁begin｜>", ("<｜tool▁calls▁end｜>",)),)),
    ToolFormat(
        "glm45", ("<tool_call>",), ("</tool_call>",),
        (re.compile(r"\s*(?P<name>[^\s<]+)\s*(?P<args>(?:<arg_key>.*)?)", _S),), arguments="pairs",
        pair_pattern=re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", _S)),
    ToolFormat(
        "qwen3_coder", ("<tool_call>",), ("</tool_call>",),
        (re.compile(r"\s*<function=(?P<name>[^>\s]+)>(?P<args>.*?)</function>\s*", _S),),
        arguments="pairs",
        pair_pattern=re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", _S)),
    ToolFormat(
        "harmony", ("<|channel|>commentary to=functions.", " to=functions."), ("<|call|>",),
        (re.compile(r"(?P<name>[^\s<]+)\s*(?:<\|channel\|>commentary)?\s*(?:<\|constrain\|>)?"
                    r"\s*(?:json)?\s*<\|message\|>(?P<args>.*)", _S),),
        framing=("<|start|>assistant", "<|channel|>final<|message|>",
                 "<|channel|>commentary<|message|>", "<|end|>", "<|return|>"),
        reasoning=(Span("<|channel|>analysis<|message|>", ("<|end|>",)),)),
    ToolFormat(
        "kimi_k2", ("<|tool_call_begin|>",), ("<|tool_call_end|>",),
        (re.compile(r"\s*(?P<id>(?:functions\.)?(?P<name>[^\s<]+):\d+)\s*"
                    r"<\|tool_call_argument_begin\|>(?P<args>.*)", _S),),
        sections=(Span("<|tool_calls_section_begin|>", ("<|tool_calls_section_end|>",)),)),
)}

# what a chat template writes for tool calls -> its family (the most specific first)
_TEMPLATE_SIGNS = (
    ("<arg_key>", "glm45"),
    ("<function=", "qwen3_coder"),
    ("<|tool_calls_section_begin|>", "kimi_k2"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|channel|>", "harmony"),
    ("<tool_call>", "hermes"),
)
_MODEL_TYPES = {  # config.json's model_type -> family, when the template says nothing
    "qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes",
    "deepseek_v3": "deepseek_v3", "glm4_moe": "glm45", "gpt_oss": "harmony",
    "kimi_k2": "kimi_k2",
}


_ARCHITECTURES = {  # config.json's architectures[0] -> family, the last resort
    "Qwen2ForCausalLM": "hermes", "Qwen2MoeForCausalLM": "hermes", "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes", "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm45", "GptOssForCausalLM": "harmony",
}


# What Qwen3, DeepSeek-R1, GLM and Kimi's thinking models write before their answer (no calls).
THINK_FORMAT = ToolFormat("think", (), (), (), reasoning=(Span("<think>", ("</think>",)),))


def tool_format(model_type: str | None = None, chat_template: str | None = None,
                architecture: str | None = None) -> ToolFormat | None:
    """The format a model writes tool calls in: read from its chat template (what it was
    trained to write), else from config.json's ``model_type``, else its architecture (Kimi K2
    is a DeepseekV3ForCausalLM: only its template or model_type tells); None when none says."""
    for sign, family in _TEMPLATE_SIGNS:
        if chat_template and sign in chat_template:
            return FORMATS[family]
    family = _MODEL_TYPES.get((model_type or "").lower()) or _ARCHITECTURES.get(architecture or "")
    return FORMATS[family] if family else None


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def ollama(self) -> dict[str, Any]:
        """Ollama's ``message.tool_calls`` item."""
        return {"function": {"name": self.name, "arguments": self.arguments}}

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` item; with ``index``, a streaming ``delta.tool_calls`` item
        (the whole call in one delta)."""
        item = {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return item if index is None else {"index": index, **item}


Event = Content | Thinking | ToolCall


class ToolCallStream:
    """Split generated text into :class:`Content`, :class:`Thinking` and :class:`ToolCall`
    events as it arrives. ``tools`` (the request's, OpenAI's shape) tells GLM's pairs which
    arguments are strings."""

    def __init__(self, fmt: ToolFormat, tools: Iterable[Mapping] | None = None,
                 in_reasoning: bool = False):
        """``in_reasoning``: the answer starts inside the format's first reasoning span (the
        prompt already opened it, as templates that end their generation prompt with
        ``<think>`` do)."""
        self.fmt = fmt
        self.string_args = _string_arguments(tools)
        self._markers = fmt.markers()
        self._buffer = ""
        # the reasoning span we are in
        self._span: Span | None = fmt.reasoning[0] if in_reasoning and fmt.reasoning else None
        self._section: Span | None = None
        self._call_start: str | None = None  # the marker of the open call
        self._after_call = False  # whitespace is held after a call
        self._held_ws = ""
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def split(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        """``feed`` (and, when ``final``, ``finish``) as (content, thinking, calls): what a
        generation chunk becomes."""
        events = self.feed(text) + (self.finish() if final else [])
        return (_joined(events, Content), _joined(events, Thinking),
                [e for e in events if isinstance(e, ToolCall)])

    def finish(self) -> list[Event]:
        """The events still held at the end of the answer (an open call is read as ended)."""
        events = self.feed("")
        rest, self._buffer = self._buffer, ""
        if self._call_start is not None:
            self._end_call(rest, "", events)
        elif self._span is not None:
            _add(events, Thinking(rest))
        else:
            self._text(rest, events)  # whitespace still held after a call is dropped
        return [e for e in events if not isinstance(e, (Content, Thinking)) or e.text]

    # --- one step: consume the buffer up to the next decision; False when it must wait ----
    def _step(self, events: list[Event]) -> bool:
        if self._call_start is not None:
            index, end = _find_first(self._buffer, self.fmt.call_ends)
            if end is None:
                return False
            self._end_call(self._buffer[:index], end, events)
            self._buffer = self._buffer[index + len(end):]
            return True
        if self._span is not None:
            return self._in_reasoning(events)
        index, marker = _next_marker(self._buffer, self._markers)
        if marker is None:  # emit all but a tail that could begin a marker
            self._text(self._buffer[:index], events)
            self._buffer = self._buffer[index:]
            return False
        self._text(self._buffer[:index], events)
        self._buffer = self._buffer[index + len(marker):]
        self._open(marker, events)
        return True

    def _open(self, marker: str, events: list[Event]) -> None:
        if marker in self.fmt.call_starts:
            self._call_start = marker
            return
        for span in self.fmt.sections:
            if marker == span.start:
                self._section = span
            elif self._section is span and marker in span.ends:
                self._section = None
        for span in self.fmt.reasoning:
            if marker == span.start:
                self._span = span
        # framing, stray end markers and section markers are never content

    def _in_reasoning(self, events: list[Event]) -> bool:
        index, end = _find_first(self._buffer, self._span.ends)
        if end is not None:
            _add(events, Thinking(self._buffer[:index]))
            self._buffer = self._buffer[index + len(end):]
            self._span = None
            return True
        keep = _held_length(self._buffer, self._span.ends)
        _add(events, Thinking(self._buffer[:len(self._buffer) - keep]))
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._section is not None and not text.strip():
            return  # newlines between the calls of a section
        if self._after_call and not text.strip():
            self._held_ws += text
            return
        text, self._held_ws = self._held_ws + text, ""
        self._after_call = False
        _add(events, Content(text))

    def _end_call(self, body: str, end: str, events: list[Event]) -> None:
        start, self._call_start = self._call_start, None
        call = read_call(self.fmt, body, self.string_args)
        if call is None:
            log.warning("a %s tool call could not be read; passed on as text", self.fmt.family)
            self._after_call = False
            self._text(start + body + end, events)
            return
        self.calls += 1
        self._after_call, self._held_ws = True, ""
        events.append(call)


def request_tools(value: Any) -> list[dict] | None:
    """A request's ``tools`` (Ollama's and OpenAI's shape: [{"type": "function", "function":
    {"name", "description", "parameters"}}]) checked; None or [] = no tools. ValueError
    names the first bad entry."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ValueError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
    return [dict(tool) for tool in value]


def request_tool_choice(value: Any) -> str:
    """OpenAI's ``tool_choice``: "auto" (the default) or "none"; forcing a call ("required",
    a named function) is refused with a ValueError."""
    if value is None or value == "auto":
        return "auto"
    if value == "none":
        return "none"
    raise ValueError(f"tool_choice {value!r} is not supported: use \"auto\" or \"none\"")


def template_tool_calls(calls: Any) -> list[dict]:
    """An assistant message's ``tool_calls`` (OpenAI's arguments as a JSON string, Ollama's as
    an object) in the shape chat templates read: arguments always an object."""
    if not isinstance(calls, list):
        raise ValueError("'tool_calls' must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool_calls[{i}] must be {{\"function\": {{\"name\", \"arguments\"}}}}")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = _json_object(arguments)
        if not isinstance(arguments, dict):
            raise ValueError(f"tool_calls[{i}].function.arguments must be a JSON object")
        item = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def parse_tool_calls(fmt: ToolFormat, text: str, tools: Iterable[Mapping] | None = None
                     ) -> tuple[str, list[ToolCall], str]:
    """A whole answer -> (content, tool calls, thinking)."""
    content, thinking, calls = ToolCallStream(fmt, tools).split(text, final=True)
    return content, calls, thinking


def read_call(fmt: ToolFormat, body: str, string_args: Mapping[str, set] | None = None
              ) -> ToolCall | None:
    """One call's text (between its markers) -> a ToolCall, or None if it cannot be read."""
    for pattern in fmt.call_patterns:
        match = pattern.fullmatch(body)
        if match is None:
            continue
        groups = match.groupdict()
        name, args = (groups.get("name") or "").strip(), groups.get("args") or ""
        if fmt.arguments == "json_named":
            name, arguments = _named_json(args)
        elif fmt.arguments == "pairs":
            arguments = _pairs(fmt.pair_pattern, args, (string_args or {}).get(name, set()))
        else:
            arguments = _json_object(args)
        if not name or arguments is None:
            return None
        return ToolCall(name, arguments, groups["id"]) if groups.get("id") else \
            ToolCall(name, arguments)
    return None


def _json_object(text: str) -> dict | None:
    text = text.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _named_json(text: str) -> tuple[str, dict | None]:
    """Hermes: {"name": N, "arguments": {...}} ("parameters" is accepted; arguments written
    as a JSON string are read)."""
    value = _json_object(text)
    if value is None or not isinstance(value.get("name"), str):
        return "", None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json_object(arguments)
    return value["name"], arguments if isinstance(arguments, dict) else None


def _pairs(pattern: re.Pattern, text: str, string_args: set) -> dict | None:
    """GLM's <arg_key>k</arg_key><arg_value>v</arg_value> or Qwen3-Coder's
    <parameter=k>v</parameter> pairs. A value is JSON when it reads as JSON and the tool
    does not declare that argument a string; else the text itself."""
    pairs = pattern.findall(text)
    if pattern.sub("", text).strip():  # text outside the pairs: not a call we can read
        return None
    arguments = {}
    for key, raw in pairs:
        key, raw = key.strip(), raw.strip()
        if key in string_args:
            arguments[key] = raw
            continue
        try:
            arguments[key] = json.loads(raw)
        except json.JSONDecodeError:
            arguments[key] = raw
    return arguments


def _string_arguments(tools: Iterable[Mapping] | None) -> dict[str, set]:
    """tool name -> names of its arguments declared {"type": "string"}."""
    out: dict[str, set] = {}
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, Mapping) else {}
        properties = (function.get("parameters") or {}).get("properties") or {}
        out[function.get("name", "")] = {
            k for k, v in properties.items() if isinstance(v, Mapping) and v.get("type") == "string"}
    return out


def _joined(events: list[Event], kind: type) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def _add(events: list[Event], event: Content | Thinking) -> None:
    """Append, merging with a previous event of the same kind."""
    if not event.text:
        return
    if events and type(events[-1]) is type(event):
        events[-1] = type(event)(events[-1].text + event.text)
    else:
        events.append(event)


def _find_first(text: str, markers: Iterable[str]) -> tuple[int, str | None]:
    """(index, marker) of the earliest whole marker in ``text``, or (-1, None)."""
    best = (-1, None)
    for marker in markers:
        index = text.find(marker)
        if index >= 0 and (best[1] is None or index < best[0]):
            best = (index, marker)
    return best


def _held_length(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some marker."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _next_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The next marker that is sure: (its index, it), or (where the undecided tail begins,
    None) when none is, or when a marker could still begin before the first whole one."""
    index, marker = _find_first(text, markers)
    undecided = len(text) - _held_length(text, markers)
    if marker is None or undecided < index:
        return undecided, None
    return index, marker
