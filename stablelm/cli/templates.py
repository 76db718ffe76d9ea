"""Chat templates for `stablelm chat --chat-template`: the built-in ones, and reading one from a file.

The built-ins are the formats StableLM's chat models were trained on, as their tokenizer_config.json
writes them (rendered with Jinja's trim_blocks and lstrip_blocks, as the reference renders them):
- `zephyr` (stablelm-zephyr-3b, stablelm-2-zephyr-1_6b): `<|user|>\\n{message}<|endoftext|>\\n` per turn
  (the eos token ends each), then `<|assistant|>\\n`;
- `chatml` (stablelm-2-1_6b-chat, stablelm-2-12b-chat): `<|im_start|>{role}\\n{message}<|im_end|>\\n`,
  then `<|im_start|>assistant\\n`.
Each also names the text that ends a reply, so that a model whose tokenizer does not know it as its
end token still stops there, and the special tokens it needs where the tokenizer defines none (zephyr's
eos_token, `<|endoftext|>` as in StableLM's vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template, the strings that end a reply in it (besides the tokenizer's end token), and the
    template's variables to use where the tokenizer has none of its own (`defaults`)."""

    name: str
    source: str
    stops: tuple[str, ...] = ()
    defaults: tuple[tuple[str, str], ...] = ()


BUILTIN: dict[str, ChatFormat] = {
    "chatml": ChatFormat("chatml", CHATML, ("<|im_end|>", "<|im_start|>")),
    "zephyr": ChatFormat(
        "zephyr", ZEPHYR, ("<|user|>", "<|endoftext|>"), defaults=(("eos_token", "<|endoftext|>"),)
    ),
}


def find_template(value: str) -> ChatFormat | None:
    """--chat-template's value: a file's template, a built-in one, or None (maybe one of the tokenizer's
    own templates by name, which only the loaded tokenizer can tell).

    Raises:
        UsageError: The file cannot be read, or is not UTF-8 text.
    """
    path = Path(value).expanduser()
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--chat-template: {path} is not UTF-8 text (a Jinja template)") from None
        except OSError as err:
            raise UsageError(f"--chat-template: cannot read {path}: {err.strerror or err}") from None
        if not source.strip():
            raise UsageError(f"--chat-template: {path} is empty")
        return ChatFormat(str(path), source)
    if value.lower() in BUILTIN:
        return BUILTIN[value.lower()]
    if path.exists():
        raise UsageError(f"--chat-template: {path} is not a file")
    return None


def chosen_template(tokenizer: Any, value: str, chat_format: ChatFormat | None) -> tuple[str, dict[str, str]]:
    """The template --chat-template `value` names for this tokenizer (`chat_format`: what `find_template`
    found for it), and the variables to render it with: a built-in's special tokens the tokenizer does
    not define itself.

    Raises:
        UsageError: `value` is no file, no built-in and none of the tokenizer's named templates.
    """
    if chat_format is not None:
        known = tokenizer.special_tokens_map
        return chat_format.source, {
            name: token for name, token in chat_format.defaults if not known.get(name)
        }
    if isinstance(tokenizer.chat_template, dict) and value in tokenizer.chat_template:
        return tokenizer.chat_template[value], {}
    raise unknown_template(value)


def unknown_template(value: str) -> UsageError:
    """The error for a --chat-template that is no file, no built-in name and no template of the model."""
    return UsageError(
        f"--chat-template {value!r}: no such file, and not a built-in template "
        f"({', '.join(sorted(BUILTIN))}) or one the tokenizer names"
    )
