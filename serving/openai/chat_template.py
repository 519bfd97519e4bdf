"""Chat templates: find the model's, and render it the way Hugging Face `transformers` does.

A sandboxed jinja2 environment (immutable, trim_blocks, lstrip_blocks, loop controls, the
``raise_exception`` and ``strftime_now`` globals, a ``tojson`` that keeps non-ASCII text),
called with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, as
``PreTrainedTokenizerBase.apply_chat_template`` calls it.

Where the template comes from, first found: ``--chat-template FILE``; the repository's
``tokenizer/1/chat_template.jinja`` (export-model copies the checkpoint's own there, from its
``chat_template.jinja`` as transformers 5 saves it, or ``tokenizer_config.json``'s
``chat_template``); else ``DEFAULT_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

CHAT_TEMPLATE_FILE = "chat_template.jinja"

# For models trained without a chat format (GPT-2 and the demo model): a plain transcript
# that ends with the assistant's turn to speak.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The template failed to render these messages (its raise_exception, or a Jinja error)."""


def checkpoint_chat_template(folder: Path) -> Optional[str]:
    """The chat template a Hugging Face checkpoint folder carries, if any."""
    folder = Path(folder)
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def load_chat_template(path: Optional[Path] = None, repository: Optional[Path] = None) -> tuple[str, str]:
    """(template, where it came from)."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8"), str(path)
    if repository is not None:
        candidate = Path(repository) / "tokenizer" / "1" / CHAT_TEMPLATE_FILE
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8"), str(candidate)
    return DEFAULT_CHAT_TEMPLATE, "default"


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: Optional[int] = None, ensure_ascii: bool = False, **kw: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text for ``messages`` (each {"role", "content"})."""
    import jinja2

    try:
        compiled = _compiled(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed: {e}") from None
