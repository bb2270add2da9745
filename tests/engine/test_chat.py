"""Chat templates rendered by krasis against transformers' apply_chat_template, same files."""

import pytest
from test_tokenizer import hf_tokenizer, train_bytelevel, train_metaspace, write_model_dir

from krasisd.engine.chat import encode_chat, render_chat
from krasisd.engine.tokenizer import Tokenizer

CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Llama-2 style: alternation enforced with raise_exception, namespace, loop controls,
# strftime_now and a {% generation %} block.
STRICT = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {% else %}
        {% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if ns.count > 6 %}{% break %}{% endif %}
{% endfor %}
{{ '[' ~ strftime_now('%Y-%m-%d') ~ ' n=' ~ ns.count ~ ']' }}
{{ dict(a=1) | tojson }}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! 🎉"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 中文?"},
     {"role": "assistant", "content": "A language, naïvely put."},
     {"role": "user", "content": "<b>and</b> \"quotes\" & more"}],
]
STRICT_CONVERSATIONS = [
    [{"role": "user", "content": " Hi "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "user", "content": str(i)} if i % 2 == 0 else
     {"role": "assistant", "content": str(i)} for i in range(9)],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]


def model_dir(tmp_path, template, backend=None, **config):
    path = tmp_path / "model"
    config = {"chat_template": template, **config} if template is not None else config
    return write_model_dir(path, backend or train_bytelevel(), config)


def render_both(path, messages, **kwargs):
    kwargs.setdefault("add_generation_prompt", True)  # transformers defaults to False, krasis True
    ours = render_chat(Tokenizer.from_dir(path), messages, **kwargs)
    theirs = hf_tokenizer(path).apply_chat_template(messages, tokenize=False, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("template,conversations", [
    (CHATML, CONVERSATIONS), (DEEPSEEK, CONVERSATIONS), (STRICT, STRICT_CONVERSATIONS)],
    ids=["chatml", "deepseek", "strict"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(tmp_path, template, conversations, add_generation_prompt):
    path = model_dir(tmp_path, template, bos_token="<｜begin▁of▁sentence｜>")
    for messages in conversations:
        ours, theirs = render_both(path, messages, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert ours.strip()


def test_deepseek_template_uses_bos_and_eos_tokens(tmp_path):
    path = model_dir(tmp_path, DEEPSEEK, bos_token="<｜begin▁of▁sentence｜>")
    text = render_chat(Tokenizer.from_dir(path), CONVERSATIONS[1])
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\nUser: What is 中文?")
    assert "naïvely put.</s>User:" in text and text.endswith("Assistant:")


def test_extra_template_variables_and_tools_match_transformers(tmp_path):
    path = model_dir(tmp_path, CHATML)
    ours, theirs = render_both(path, CONVERSATIONS[1], enable_thinking=False)
    assert ours == theirs and ours.endswith("<think>\n\n</think>\n\n")
    ours, theirs = render_both(path, CONVERSATIONS[1], tools=TOOLS)
    assert ours == theirs and '"description": "Weather <now>"' in ours


def test_tool_calls_and_none_fields_match_transformers(tmp_path):
    path = model_dir(tmp_path, CHATML)
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "11°C"},
    ]
    ours, theirs = render_both(path, messages, tools=TOOLS)
    assert ours == theirs and '"arguments": {"city": "Zürich"}' in ours


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path):
    named = [{"name": "default", "template": DEEPSEEK}, {"name": "tool_use", "template": CHATML}]
    path = model_dir(tmp_path, named)
    for tools in (None, TOOLS):
        ours, theirs = render_both(path, CONVERSATIONS[0], tools=tools)
        assert ours == theirs
    assert "<tools>" in render_chat(Tokenizer.from_dir(path), CONVERSATIONS[0], tools=TOOLS)


def test_encode_chat_matches_transformers_tokenized_template(tmp_path):
    path = model_dir(tmp_path, DEEPSEEK, bos_token="<s>", add_bos_token=True)
    ours = encode_chat(Tokenizer.from_dir(path), CONVERSATIONS[1])
    theirs = hf_tokenizer(path).apply_chat_template(CONVERSATIONS[1], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)
    assert ours == list(theirs)
    assert ours.count(Tokenizer.from_dir(path).bos_token_id) == 1


def test_raise_exception_is_a_value_error_with_the_template_message(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, STRICT))
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat(tok, [{"role": "assistant", "content": "first"}])


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m.content }", "invalid"),
    ("{% set _ = messages.append(1) %}", "rejected"),
    ("{{ messages[0].content + 1 }}", "failed"),
    ("{% set ns = namespace(_secret=1) %}", "rejected"),
])
def test_template_errors_are_value_errors(tmp_path, template, match):
    tok = Tokenizer.from_dir(model_dir(tmp_path, template))
    with pytest.raises(ValueError, match=match):
        render_chat(tok, CONVERSATIONS[0])


def test_documents_pass_through(tmp_path):
    template = "{% for d in documents or [] %}[{{ d.title }}]{% endfor %}{{ messages[0].content }}"
    path = model_dir(tmp_path, template)
    docs = [{"title": "A", "text": "x"}, {"title": "B", "text": "y"}]
    ours = render_chat(Tokenizer.from_dir(path), CONVERSATIONS[0], documents=docs)
    theirs = hf_tokenizer(path).apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                                    documents=docs)
    assert ours == theirs == "[A][B]Hi there! 🎉"


def test_sandbox_hides_python_internals(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, "[{{ messages.__class__ }}]"))
    assert render_chat(tok, CONVERSATIONS[0]) == "[]"


@pytest.mark.parametrize("messages,match", [
    ("hello", "list of dicts"), (["hello"], "must be a dict"), ([{"content": "x"}], "role"),
])
def test_bad_messages_are_value_errors(tmp_path, messages, match):
    tok = Tokenizer.from_dir(model_dir(tmp_path, CHATML))
    with pytest.raises(ValueError, match=match):
        render_chat(tok, messages)


def test_fallback_without_a_template(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, None))
    assert tok.chat_template is None and not tok.adds_bos_token
    text = render_chat(tok, CONVERSATIONS[1])
    assert text == ("System: Be brief.\n\nUser: What is 中文?\n\n"
                    "Assistant: A language, naïvely put.\n\n"
                    "User: <b>and</b> \"quotes\" & more\n\nAssistant:")
    assert render_chat(tok, CONVERSATIONS[0], add_generation_prompt=False) == (
        "User: Hi there! 🎉\n\n")
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert render_chat(tok, [{"role": "user", "content": parts}]) == "User: ab\n\nAssistant:"


def test_fallback_starts_with_bos_when_the_tokenizer_adds_one(tmp_path):
    path = model_dir(tmp_path, None, backend=train_metaspace("llama"), add_bos_token=True)
    tok = Tokenizer.from_dir(path)
    assert render_chat(tok, CONVERSATIONS[0]).startswith("<s>User: Hi")
    ids = encode_chat(tok, CONVERSATIONS[0])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
