"""Tool-call parsing (krasisd.tools): each family's emitted text split into content, thinking
and tool calls; the streaming splitter gives the same answer wherever the text is cut, and
holds back no content longer than a marker could still be starting."""

from __future__ import annotations

import json

import pytest

from krasisd.tools import (
    FORMATS,
    Content,
    Thinking,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    request_tool_choice,
    request_tools,
    template_tool_calls,
    tool_format,
)

WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"tz": "Europe/Paris"})
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

# family, emitted text, content, [(name, arguments)], thinking
CASES = [
    ("hermes",
     'I\'ll check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
     '"arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     "I'll check the weather.\n", [WEATHER, TIME], ""),
    ("hermes",  # arguments as a JSON string, and text after the call
     '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Paris\\"}"}\n'
     '</tool_call>\n\nDone.',
     "\n\nDone.", [TIME], ""),
    ("deepseek_v3",
     f"Let me look that up.{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n"
     f'{{"city": "Paris", "unit": "celsius"}}\n```{DS_CALL_END}\n{DS_CALL}function{DS_SEP}'
     f'get_time\n```json\n{{"tz": "Europe/Paris"}}\n```{DS_CALL_END}{DS_END}',
     "Let me look that up.", [WEATHER, TIME], ""),
    ("deepseek_v3",  # V3.1: name, separator, bare JSON
     f'{DS_BEGIN}{DS_CALL}get_time{DS_SEP}{{"tz": "Europe/Paris"}}{DS_CALL_END}{DS_END}',
     "", [TIME], ""),
    ("glm45",
     "I'll check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"
     "\n<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>",
     "I'll check.\n", [WEATHER], ""),
    ("glm45",  # typed values, a one-line call, and no arguments
     "<tool_call>book <arg_key>nights</arg_key> <arg_value>3</arg_value> <arg_key>zip</arg_key>"
     "<arg_value>07030</arg_value> <arg_key>pets</arg_key><arg_value>[\"cat\"]</arg_value>"
     "</tool_call><tool_call>get_time\n</tool_call>",
     "", [("book", {"nights": 3, "zip": "07030", "pets": ["cat"]}), ("get_time", {})], ""),
    ("glm45",  # GLM-4.7 writes no separators
     "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>unit"
     "</arg_key><arg_value>celsius</arg_value></tool_call>",
     "", [WEATHER], ""),
    ("qwen3_coder",
     "Checking.\n<tool_call>\n<function=book>\n<parameter=nights>\n3\n</parameter>\n"
     "<parameter=zip>\n07030\n</parameter>\n</function>\n</tool_call>",
     "Checking.\n", [("book", {"nights": 3, "zip": "07030"})], ""),
    ("harmony",
     "<|channel|>analysis<|message|>Need the weather for Paris.<|end|><|start|>assistant"
     "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
     '{"city":"Paris","unit":"celsius"}<|call|>',
     "", [WEATHER], "Need the weather for Paris."),
    ("harmony",  # recipient in the role header; <|call|> is EOS, so never emitted
     "<|channel|>analysis<|message|>Time.<|end|><|start|>assistant to=functions.get_time"
     '<|channel|>commentary json<|message|>{"tz": "Europe/Paris"}',
     "", [TIME], "Time."),
    ("harmony",
     "<|channel|>analysis<|message|>Just greet.<|end|><|start|>assistant<|channel|>final"
     "<|message|>Hello there!",
     "Hello there!", [], "Just greet."),
    ("kimi_k2",
     "I'll check both.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
     '<|tool_call_argument_begin|>{"city": "Paris", "unit": "celsius"}<|tool_call_end|>'
     '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"tz": '
     '"Europe/Paris"}<|tool_call_end|><|tool_calls_section_end|>',
     "I'll check both.", [WEATHER, TIME], ""),
    ("hermes", "No tools needed: 2 < 3 and <b>bold</b>.",
     "No tools needed: 2 < 3 and <b>bold</b>.", [], ""),
    ("hermes",  # a call that cannot be read is passed on as text
     'Try <tool_call>{"name": "get_time", "arguments": {"tz": </tool_call> end',
     'Try <tool_call>{"name": "get_time", "arguments": {"tz": </tool_call> end', [], ""),
    ("hermes", "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Europe/Paris\"}}",
     "", [TIME], ""),  # cut at the end of the answer: the open call is read as ended
]
TOOLS = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"nights": {"type": "integer"}, "zip": {"type": "string"},
                                     "pets": {"type": "array"}}}}}]


def _summary(events):
    content = "".join(e.text for e in events if isinstance(e, Content))
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)]
    return content, calls, thinking


def _ids(case):
    return f"{case[0]}-{CASES.index(case)}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_whole_answers_split_into_content_calls_and_thinking(case):
    family, text, content, calls, thinking = case
    got_content, got_calls, got_thinking = parse_tool_calls(FORMATS[family], text, TOOLS)
    assert (got_content, [(c.name, c.arguments) for c in got_calls], got_thinking) == \
        (content, calls, thinking)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_streaming_gives_the_same_split_at_every_cut(case):
    family, text, content, calls, thinking = case
    for cut in range(len(text) + 1):
        stream = ToolCallStream(FORMATS[family], TOOLS)
        events = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.finish()
        assert _summary(events) == (content, calls, thinking), f"cut at {cut}: {text[:cut]!r}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_streaming_one_character_at_a_time(case):
    family, text, content, calls, thinking = case
    stream = ToolCallStream(FORMATS[family], TOOLS)
    events = [e for char in text for e in stream.feed(char)] + stream.finish()
    assert _summary(events) == (content, calls, thinking)
    assert all(not isinstance(e, (Content, Thinking)) or e.text for e in events)


@pytest.mark.parametrize("family, text, emitted", [
    ("hermes", "Hello", "Hello"),  # nothing here can begin a marker
    ("hermes", "Hello <tool", "Hello "),  # "<tool" could be <tool_call>
    ("hermes", "a < b", "a < b"),  # "< b" cannot
    ("hermes", "x <tool_cal", "x "),
    ("kimi_k2", "Sure<|tool_calls", "Sure"),
    ("harmony", "<|channel|>final<|message|>Hi <|e", "Hi "),
    ("harmony", "<|channel|>analysis<|message|>hmm <|en", "hmm "),  # as thinking
])
def test_content_is_held_only_while_a_marker_could_start(family, text, emitted):
    events = ToolCallStream(FORMATS[family]).feed(text)
    assert "".join(e.text for e in events if not isinstance(e, ToolCall)) == emitted


def test_a_call_comes_out_whole_as_soon_as_it_closes():
    stream = ToolCallStream(FORMATS["hermes"])
    assert stream.feed('Hi <tool_call>{"name": "get_time", "arguments": {}}') == [Content("Hi ")]
    [call] = stream.feed("</tool_call>")
    assert (call.name, call.arguments) == ("get_time", {})
    assert stream.feed("\n") == []  # whitespace after a call waits for more content
    assert stream.feed("ok") == [Content("\nok")]
    assert stream.finish() == []


def test_split_turns_chunks_into_content_thinking_and_calls():
    stream = ToolCallStream(FORMATS["harmony"])
    assert stream.split("<|channel|>analysis<|message|>Think") == ("", "Think", [])
    assert stream.split("ing.<|end|><|start|>assistant to=functions.get_time") == ("", "ing.", [])
    content, thinking, [call] = stream.split('<|channel|>commentary json<|message|>{}', final=True)
    assert (content, thinking, call.name, call.arguments) == ("", "", "get_time", {})


def test_kimi_keeps_its_call_ids():
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
            '<|tool_call_argument_begin|>{"tz": "UTC"}<|tool_call_end|><|tool_calls_section_end|>')
    _, [call], _ = parse_tool_calls(FORMATS["kimi_k2"], text)
    assert call.id == "functions.get_time:0"
    assert call.openai()["id"] == "functions.get_time:0"


def test_ollama_and_openai_shapes():
    call = ToolCall("get_weather", {"city": "Zürich", "days": 2})
    assert call.ollama() == {"function": {"name": "get_weather",
                                          "arguments": {"city": "Zürich", "days": 2}}}
    item = call.openai()
    assert item["id"].startswith("call_") and item["type"] == "function"
    assert item["function"]["name"] == "get_weather"
    assert json.loads(item["function"]["arguments"]) == {"city": "Zürich", "days": 2}
    assert "Zürich" in item["function"]["arguments"]  # not \u-escaped
    assert call.openai(index=1) == {"index": 1, **item}
    assert ToolCall("a", {}).id != ToolCall("a", {}).id


@pytest.mark.parametrize("model_type, template, family", [
    (None, "{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}", "hermes"),
    ("qwen3_moe", None, "hermes"),
    ("glm4_moe", None, "glm45"),
    (None, "<tool_call>{{ name }}<arg_key>{{ k }}</arg_key>", "glm45"),
    ("deepseek_v3", "{{ '<｜tool▁calls▁begin｜>' }}", "deepseek_v3"),
    ("deepseek_v3", "{{ '<|tool_calls_section_begin|>' }}", "kimi_k2"),  # Kimi K2 is a V3
    ("kimi_k2", None, "kimi_k2"),
    ("gpt_oss", None, "harmony"),
    (None, "<|channel|>commentary to=functions.x <|constrain|>json<|message|>", "harmony"),
    (None, "{{- '<|start|>assistant to=' }}{{- 'functions.' + name + '<|channel|>commentary json'}}",
     "harmony"),
    ("qwen3_moe", "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}", "qwen3_coder"),
    ("deepseek_v2", "{{ bos_token }}{% for m in messages %}User: {{ m.content }}{% endfor %}",
     None),
    (None, None, None),
])
def test_the_format_comes_from_the_template_then_the_model_type(model_type, template, family):
    fmt = tool_format(model_type, template)
    assert (fmt.family if fmt else None) == family


@pytest.mark.parametrize("architecture, family", [
    ("Qwen3MoeForCausalLM", "hermes"), ("DeepseekV3ForCausalLM", "deepseek_v3"),
    ("Glm4MoeForCausalLM", "glm45"), ("GptOssForCausalLM", "harmony"),
    ("DeepseekV2ForCausalLM", None),
])
def test_the_architecture_is_the_last_resort(architecture, family):
    fmt = tool_format(architecture=architecture)
    assert (fmt.family if fmt else None) == family
    assert tool_format("kimi_k2", architecture=architecture).family == "kimi_k2"


def test_no_marker_of_a_family_is_a_prefix_of_another():
    """The splitter decides at the first whole marker; a marker that began another would be
    taken too early."""
    for fmt in FORMATS.values():
        markers = set(fmt.markers())
        for a in markers:
            assert not any(b != a and b.startswith(a) for b in markers), (fmt.family, a)


def test_request_tools_are_checked():
    assert request_tools(None) is None and request_tools([]) is None
    assert request_tools(TOOLS) == TOOLS
    for bad, message in [
        ({"type": "function"}, "must be a list"),
        ([{"type": "retrieval", "function": {"name": "x"}}], r"tools\[0\] must be"),
        ([{"type": "function", "function": {"name": ""}}], r"tools\[0\].function.name"),
        ([{"function": {"name": "x", "parameters": []}}], "parameters must be a JSON schema"),
    ]:
        with pytest.raises(ValueError, match=message):
            request_tools(bad)


def test_tool_choice_auto_or_none():
    assert [request_tool_choice(v) for v in (None, "auto", "none")] == ["auto", "auto", "none"]
    for forced in ("required", {"type": "function", "function": {"name": "get_time"}}):
        with pytest.raises(ValueError, match='use "auto" or "none"'):
            request_tool_choice(forced)


def test_assistant_tool_calls_reach_templates_with_object_arguments():
    openai = [{"id": "call_1", "type": "function",
               "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]
    ollama = [{"function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]
    expected = {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    assert template_tool_calls(openai) == [{**expected, "id": "call_1"}]
    assert template_tool_calls(ollama) == [expected]
    with pytest.raises(ValueError, match="arguments must be a JSON object"):
        template_tool_calls([{"function": {"name": "f", "arguments": "[1]"}}])
    with pytest.raises(ValueError, match=r"tool_calls\[0\] must be"):
        template_tool_calls([{"name": "f"}])
