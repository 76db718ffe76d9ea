"""Hostile or damaged tokenizer files, and chat templates that would hang or exhaust memory.

Damaged files are refused with a ValueError naming the file (and the field); templates end with a
ChatTemplateError within their budget of time and size, and real templates render as the reference does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import transformers

from stablelm.tokenizer import AutoTokenizer, ChatTemplateError, ChatTemplateSecurityError, template_budget
from stablelm.tokenizer.chat_template import render_chat_template

FIXTURES = Path(__file__).parents[1] / "fixtures"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another <one> & 'more'?"},
]


@pytest.fixture
def folder(tmp_path) -> Path:
    """A copy of the gpt-neox-20b fixture, to damage."""
    return Path(shutil.copytree(FIXTURES / "gpt-neox-20b", tmp_path / "tok"))


def _edit(folder: Path, **changes) -> Path:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def _refused(folder: Path, path: Path, *words: str) -> None:
    with pytest.raises(ValueError) as info:
        AutoTokenizer.from_pretrained(folder)
    for word in (str(path), *words):
        assert word in str(info.value)


# --- tokenizer files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a', b"{}", b"\xff\xfe\x00"]
)
def test_damaged_tokenizer_json_names_the_file(folder, content):
    path = folder / "tokenizer.json"
    path.write_bytes(content)
    _refused(folder, path, "not a readable tokenizer.json")


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
)
def test_non_utf8_or_non_object_json_files_name_the_file(folder, name):
    path = folder / name
    path.write_bytes(b'{"eos_token": "\xff"}')
    _refused(folder, path, "not UTF-8")
    path.write_text("[1, 2]")
    _refused(folder, path, "holds a JSON list")


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model_max_length": "lots"}, "model_max_length"),
        ({"model_max_length": "4096"}, "model_max_length"),
        ({"model_max_length": -1}, "model_max_length"),
        ({"model_max_length": True}, "model_max_length"),
        ({"padding_side": "up"}, "padding_side"),
        ({"truncation_side": ["left"]}, "truncation_side"),
        ({"clean_up_tokenization_spaces": "false"}, "clean_up_tokenization_spaces"),
        ({"eos_token": 5}, "eos_token"),
        ({"extra_special_tokens": "<a>"}, "extra_special_tokens"),
        ({"additional_special_tokens": [7]}, "additional_special_tokens"),
        ({"chat_template": 5}, "chat_template"),
        ({"chat_template": [{"template": "T"}]}, "chat_template entry 0"),
        ({"chat_template": [{"name": "a", "template": "A"}, "B"]}, "chat_template entry 1"),
        ({"chat_template": [{"name": "a", "template": ["A"]}]}, "chat_template entry 0"),
    ],
)
def test_wrong_values_in_tokenizer_config_name_the_field_and_file(folder, changes, field):
    _refused(folder, _edit(folder, **changes), field)


def test_wrong_special_tokens_map_names_its_file(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "added_tokens_decoder"})
    )
    path = folder / "special_tokens_map.json"
    path.write_text(json.dumps({"pad_token": ["<|padding|>"]}))
    _refused(folder, path, "pad_token")


def test_non_utf8_chat_template_file_names_the_file(folder):
    path = folder / "chat_template.jinja"
    path.write_bytes(b"{{ messages[0].content }}\xff")
    _refused(folder, path, "not UTF-8")


def test_loose_but_valid_values_still_load(folder):
    _edit(folder, model_max_length=1e30, clean_up_tokenization_spaces=None, chat_template=None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == int(1e30) and tokenizer.chat_template is None


# --- rendering errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template,error",
    [
        ("{{ '{0}'.format_map({}) }}", "IndexError"),
        ("{{ 1 + 'a' }}", "TypeError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages[0].content.split(1) }}", "TypeError"),
    ],
)
def test_python_errors_in_templates_are_chat_template_errors(template, error):
    with pytest.raises(ChatTemplateError, match=f"The chat template failed to render: {error}"):
        render_chat_template(template, MESSAGES)


@pytest.fixture
def short_budget(monkeypatch):
    """A budget of 0.3 s, so that the templates that would run for hours end quickly."""
    monkeypatch.setattr(template_budget, "MAX_SECONDS", 0.3)


HANGS = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for m in messages recursive %}{% if loop.depth < 40 %}{{ loop(messages) }}{% endif %}{% endfor %}",
]


@pytest.mark.parametrize(
    "template", HANGS, ids=["nested-range", "nested-strings", "macro-tree", "recursive-loop"]
)
def test_templates_that_would_hang_stop_at_the_time_budget(short_budget, pair_tokenizer, template):
    with pytest.raises(ChatTemplateError, match="exceeded its budget: it ran for more than 0.3 seconds"):
        pair_tokenizer.apply_chat_template(MESSAGES, chat_template=template)


TOO_BIG = [
    ("{{ 'x' * 10**10 }}", "repeating a value"),
    ("{{ [1, 2] * 10000000000 }}", "repeating a value"),
    ("{{ 10 ** (10 ** 10) }}", "bits"),
    ("{% for i in range(10**9) %}{% endfor %}", "more than 100,000 items"),
    ("{{ range(10**30)|length }}", "more than 100,000 items"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "too deeply"),
    ("{{ 'x'.center(10**10) }}", "str.center"),
    ("{{ 'x'|center(10**10) }}", "center"),
    ("{{ ['x']|map('center', 10**10)|list }}", "center"),
    ("{{ '{:>999999999}'.format(1) }}", "width"),
    ("{{ '%0999999999d' % 1 }}", "width"),
    ("{{ '%*d' % (10**9, 1) }}", "width"),
    ("{{ '%s'|format('x') * 99999999 }}", "repeating a value"),
    ("{{ ('{0}' * 100000).format('x' * 1000000) }}", "fields"),
    ("{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}", "replace"),
    ("{% set s = 'x' * 1000000 %}{{ s|replace('x', s) }}", "replace"),
    ("{% set s = 'x' * 1000000 %}{{ s.join(s) }}", "joining"),
    ("{% set s = 'x' * 1000000 %}{{ range(1000)|join(s) }}", "joining"),
    ("{% set s = 'x' * 1000000 %}{{ s.translate({120: s}) }}", "translate"),
    ("{{ ('\t' * 1000000).expandtabs(1000) }}", "expandtabs"),
    ("{{ ('a\n' * 1000)|indent(1000000) }}", "indent"),
    ("{{ ('x' * 1000000)|wordwrap(1, wrapstring='y' * 1000) }}", "wordwrap"),
    ("{{ [1]|batch(10**9, 'x')|list|length }}", "batch"),
    ("{{ lipsum(10**6) }}", "lipsum"),
    ("{{ messages|tojson(indent=10**9) }}", "indent"),
    ("{{ strftime_now('%c' * 1000000) }}", "format"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "+"),
    ("{% set ns = namespace(n=3) %}{% for i in range(60) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    (
        "{% set a = 'x' * 1000000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}{% set c = [b, b, b, b, b, b, b, b, b, b] %}"
        "{% set d = [c, c, c, c, c, c, c, c, c, c] %}{{ d|string|length }}",
        "literal",
    ),
    (
        "{% set s = 'x' * 1000000 %}{% set x %}{% for i in range(99999) %}{{ s }}{% endfor %}{% endset %}",
        "block",
    ),
    ("{% set s = 'x' * 1000000 %}{% for i in range(99999) %}{{ s }}{% endfor %}", "its text"),
    ("{{ dict.fromkeys(range(99999), 'x' * 1000000) }}", "a call's result"),
    ("{% set ns = namespace() %}{% set d = {'n': ns} %}{% set ns.d = d %}{{ d }}", "a value to print"),
]


@pytest.mark.parametrize("template,reason", TOO_BIG, ids=[f"{i}-{r}" for i, (_, r) in enumerate(TOO_BIG)])
def test_templates_that_would_exhaust_memory_stop_at_the_size_budget(template, reason):
    with pytest.raises(ChatTemplateError, match="exceeded its budget") as info:
        render_chat_template(template, MESSAGES)
    assert reason in str(info.value)


def test_output_size_limit_is_the_budget(monkeypatch):
    monkeypatch.setattr(template_budget, "MAX_CHARS", 10_000)
    template = "{% for i in range(11) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="exceeded its budget: its text would pass 10,000 characters"):
        render_chat_template(template, MESSAGES)
    assert render_chat_template(template.replace("11", "10"), MESSAGES) == "x" * 10_000


def test_template_source_size_is_limited():
    with pytest.raises(ChatTemplateError, match="2,000,000 characters long, more than the 1,048,576"):
        render_chat_template("x" * 2_000_000, MESSAGES)


ESCAPES = [
    "{{ range.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ range(3).__class__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ ''.format.__globals__ }}",
    "{{ (messages|map('string')).__class__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_the_budget_opens_no_way_out_of_the_sandbox(template):
    with pytest.raises(ChatTemplateSecurityError):
        render_chat_template(template, MESSAGES)


# --- real templates render as before -----------------------------------------------------------------------

KITCHEN_SINK = """{%- macro box(text, width=20) -%}[{{ text|center(width) }}]{%- endmacro -%}
{%- macro wrap() -%}<{{ caller()|trim }}>{%- endmacro -%}
{%- set ns = namespace(count=0, roles=[]) -%}
{%- set sep = '-' * 10 -%}
{%- for message in messages -%}
{%- set ns.count = ns.count + 1 -%}
{%- set ns.roles = ns.roles + [message.role] -%}
{{ loop.index }}/{{ loop.length }} {{ loop.cycle('odd', 'even') }} {{ box(message.role) }}
{%- if message.content is string %} {{ message['content'] ~ '|' ~ (message.content|length) }}{% endif %}
{% call wrap() %}  {{ '%s:%03d' % (message.role, loop.index0) }} {{ '{}#{:>4}'.format(message.role, loop.index) }} {% endcall %}
{% if loop.last %}{{ sep }}{% endif %}
{%- endfor %}
{% set summary %}{{ ns.roles|join(',') }}{% endset %}{{ summary|upper }} {{ ns.count }}
{{ dict(a=1, b=[1, 2])|tojson(indent=2) }}
{{ tools|tojson }} {{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list|tojson }}
{% for i in range(3) %}{{ i }}{% if not loop.last %}, {% endif %}{% endfor %} {{ range(5)|reverse|list }}
{% for item in [1, [2, [3]]] recursive %}{% if item is iterable %}({{ loop(item) }}){% else %}{{ item }}{% endif %}{% endfor %}
{% filter upper %}{{ ('a\\nb')|indent(2, true) }}{% endfilter %} {{ 'x,y'.split(',') }} {{ (1, 2) }} {{ 2 ** 10 }}
{% generation %}{{ messages[-1].content|wordwrap(10) }}{% endgeneration %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

TEMPLATES = {
    "zephyr": json.loads((FIXTURES / "gpt-neox-20b" / "tokenizer_config.json").read_text())["chat_template"],
    "chatml": json.loads((FIXTURES / "cl100k-dolma2" / "tokenizer_config.json").read_text())["chat_template"],
    "kitchen-sink": KITCHEN_SINK,
}


def _reference(template: str, messages: list, **kwargs) -> str:
    render = transformers.utils.chat_template_utils.render_jinja_template
    rendered, _ = render([messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_templates_render_exactly_as_the_reference(name):
    template, tools = TEMPLATES[name], [{"name": "f", "parameters": {"type": "object"}}]
    for prompt in (True, False):
        ours = render_chat_template(
            template, MESSAGES, add_generation_prompt=prompt, variables={"eos_token": "</s>", "tools": tools}
        )
        assert ours == _reference(
            template, MESSAGES, add_generation_prompt=prompt, eos_token="</s>", tools=tools
        )
    assert "exceeded" not in ours


def test_a_long_conversation_is_within_the_budget():
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": f"{i} " + "word " * 200} for i in range(2000)
    ]
    template = TEMPLATES["chatml"]
    assert render_chat_template(template, messages) == _reference(template, messages)


@pytest.fixture(scope="module")
def pair_tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")
