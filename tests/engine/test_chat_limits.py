"""Chat templates are code from the model folder: rendering stops at RenderLimits."""

import time

import jinja2.ext
import pytest
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import models

from krasisd.engine.chat import ChatTemplateLimitError, RenderLimits, render_chat
from krasisd.engine.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Hello"}]
FAST = RenderLimits(time_s=0.5)
BOUND_S = 3.0  # the limit plus slack for a loaded machine: without limits these never end


def tokenizer(template: str) -> Tokenizer:
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Tokenizer(backend, chat_templates={"default": template})


def render(template: str, limits: RenderLimits = FAST, messages=MESSAGES) -> str:
    return render_chat(tokenizer(template), messages, limits=limits)


@pytest.mark.parametrize("template", [
    # nested loops that write nothing: 10^10 iterations
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    # a macro that calls itself twice per level: 2^40 calls, no loop at all
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    # loops over a string the template built
    "{% set s = 'x' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
])
def test_a_template_that_runs_forever_is_stopped_in_time(template):
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match=r"ran longer than 0.5 s.*stopped"):
        render(template)
    assert time.monotonic() - started < BOUND_S


def test_nested_loops_that_write_are_stopped_by_the_first_limit_they_reach():
    template = "{% for a in range(100000) %}{% for b in range(100000) %}.{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="ran longer than 0.5 s|output larger than"):
        render(template)
    assert time.monotonic() - started < BOUND_S


def test_a_recursive_loop_that_doubles_is_stopped():
    template = "{% for x in [1] recursive %}{{ loop([x, x]) }}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ValueError):  # the time limit or Python's recursion limit, whichever first
        render(template)
    assert time.monotonic() - started < BOUND_S


def test_the_default_limits_stop_a_runaway_template():
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="ran longer than 3 s"):
        render_chat(tokenizer("{% for a in range(100000) %}{% for b in range(100000) %}"
                              "{% endfor %}{% endfor %}"), MESSAGES)
    assert time.monotonic() - started < RenderLimits().time_s + BOUND_S


def test_output_beyond_the_limit_is_refused():
    limits = RenderLimits(time_s=60.0, output_chars=10_000, output_per_input=4)
    template = "{% for a in range(100000) %}{{ messages[0].content }}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="output larger than"):
        render(template, limits)
    assert time.monotonic() - started < BOUND_S


def test_the_output_limit_grows_with_the_input():
    limits = RenderLimits(output_chars=100, output_per_input=4)
    long_message = [{"role": "user", "content": "y" * 5000}]
    template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    assert render(template, limits, long_message) == "<" + "y" * 5000 + ">"


@pytest.mark.parametrize("template", [
    "{{ 'x' * 1000000000 }}",
    "{{ ['x'] * 1000000000 }}",
    "{{ 10 ** 1000000000 }}",
    "{{ '%999999999s' % 'x' }}",
    "{{ '%.999999999f' % 1.5 }}",
    "{{ '%*s' % (999999999, 'x') }}",
    "{{ 'x' | center(999999999) }}",
    "{{ 'a\nb' | indent(999999999) }}",
    "{{ '%999999999s' | format('x') }}",
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '{:>{w}}'.format('x', w=999999999) }}",
    "{{ 'x'.ljust(999999999) }}",
    "{{ 'x'.zfill(999999999) }}",
    "{{ ('y' * 500000).join(['a'] * 100000) }}",
    "{{ (['a'] * 100000) | join('y' * 500000) }}",
    "{% set s = 'y' * 500000 %}{{ ([s] * 100000) | join }}",
    "{{ ('a' * 500000).replace('', 'y' * 500000) }}",
    "{{ ('a' * 500000) | replace('a', 'y' * 500000) }}",
    "{{ range(10) | batch(999999999, 'x') | list }}",
    "{{ range(10) | slice(999999999) | list }}",
    "{{ messages | tojson(indent=999999999) }}",
])
def test_one_step_that_would_allocate_gigabytes_is_refused(template):
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="larger than"):
        render(template, RenderLimits(time_s=60.0))
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize("join", ["~", "+"])
def test_a_string_doubled_in_a_loop_is_stopped_before_it_is_large(join):
    template = ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                f"{{% set ns.s = ns.s {join} ns.s %}}{{% endfor %}}{{{{ ns.s | length }}}}")
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="joined"):
        render(template, RenderLimits(time_s=60.0))
    assert time.monotonic() - started < BOUND_S


def test_lipsum_is_not_offered():
    with pytest.raises(ValueError):
        render("{{ lipsum(n=100000, min=1000, max=1000) }}")


def test_ordinary_templates_render_as_the_plain_sandbox_does():
    template = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role }}: "
                "{{ m.content | center(11) }}{% if loop.last %}!{% endif %}\n{% endfor %}"
                "{{ '%5s|%-3d' % ('ab', 7) }}{{ '{:>4}'.format('z') }}{{ 'q' * 3 }}{{ 2 ** 10 }}"
                "{{ 'a\nb' | indent(2, true) }}{{ '%s-%s' | format(1, 2) }}{{ 'x'.rjust(3) }}"
                "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% else %}none{% endfor %}"
                "{% for x in [] %}x{% else %}empty{% endfor %}"
                "{% for x in range(3) if x != 1 %}{{ x }}{% if loop.first %},{% endif %}{% endfor %}"
                "{% for x in range(9) %}{% if x > 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"
                "{{ 'a' ~ 1 ~ none ~ m }}{{ [1] + [2] }}{{ 'ab' + 'c' }}{{ ['x', 'y'] | join(', ') }}"
                "{{ ', '.join(['p', 'q']) }}{{ 'abc'.replace('b', 'BB') }}{{ 'abc' | replace('c', 'd') }}"
                "{{ range(5) | batch(2, 0) | list }}{{ range(5) | slice(2) | list }}"
                "{{ messages | map(attribute='role') | join('/') }}")
    two = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=[jinja2.ext.loopcontrols])
    expected = plain.from_string(template).render(messages=two)
    assert "1/2 user:" in expected and "empty" in expected
    assert render(template, messages=two) == expected


def test_a_recursive_loop_renders_a_tree():
    template = ("{% for item in messages[0].content recursive %}[{{ item.name }}"
                "{% if item.children %}{{ loop(item.children) }}{% endif %}]{% endfor %}")
    tree = [{"name": "a", "children": [{"name": "b"}, {"name": "c", "children": [{"name": "d"}]}]}]
    assert render(template, messages=[{"role": "user", "content": tree}]) == "[a[b][c[d]]]"
