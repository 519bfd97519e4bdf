"""Chat templates render as transformers' apply_chat_template renders them; a checkpoint's
template is found where transformers 5 and older versions save it."""

from __future__ import annotations

import json

import pytest

from serving.openai.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    TemplateError,
    checkpoint_chat_template,
    load_chat_template,
    render,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# whitespace control, loop controls, tojson, raise_exception and the bos/eos variables
TRICKY = """{{ bos_token }}
{% for message in messages %}
  {% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system must be first') }}{% endif %}
  {% if message['content'] == 'skip' %}{% continue %}{% endif %}
  [{{ message['role'] | upper }}] {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% else %}{{ eos_token }}{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "héllo 日本"},
    {"role": "assistant", "content": "skip"},
    {"role": "user", "content": "and \"quotes\""},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_export):
    from transformers import PreTrainedTokenizerFast

    _, tokenizer, _ = tiny_export
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CHATML, TRICKY], ids=["default", "chatml", "tricky"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(hf_tokenizer, template, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    got = render(template, MESSAGES, add_generation_prompt=add_generation_prompt,
                 bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert got == expected


def test_raise_exception_and_sandbox():
    bad = [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]
    with pytest.raises(TemplateError, match="system must be first"):
        render(TRICKY, bad)
    with pytest.raises(TemplateError):  # the sandbox refuses attribute access to internals
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", MESSAGES)


def test_template_sources(tmp_path):
    assert checkpoint_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert checkpoint_chat_template(tmp_path) == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}))
    assert checkpoint_chat_template(tmp_path) == CHATML
    (tmp_path / "chat_template.jinja").write_text(TRICKY)  # transformers 5's file wins
    assert checkpoint_chat_template(tmp_path) == TRICKY
    repo = tmp_path / "repo"
    assert load_chat_template(None, repo) == (DEFAULT_CHAT_TEMPLATE, "default")
    (repo / "tokenizer" / "1").mkdir(parents=True)
    (repo / "tokenizer" / "1" / "chat_template.jinja").write_text(CHATML)
    assert load_chat_template(None, repo)[0] == CHATML
    assert load_chat_template(tmp_path / "chat_template.jinja", repo)[0] == TRICKY


def test_export_copies_the_checkpoints_template(tmp_path):
    from export.cli import copy_chat_template

    repo, ckpt = tmp_path / "repo", tmp_path / "ckpt"
    (repo / "tokenizer" / "1").mkdir(parents=True)
    ckpt.mkdir()
    assert copy_chat_template(repo, model="demo", tokenizer=None) is None
    assert copy_chat_template(repo, model=str(ckpt), tokenizer=None) is None
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    target = copy_chat_template(repo, model=str(ckpt), tokenizer=None)
    assert target == repo / "tokenizer" / "1" / "chat_template.jinja" and target.read_text() == CHATML
    assert load_chat_template(None, repo) == (CHATML, str(target))
