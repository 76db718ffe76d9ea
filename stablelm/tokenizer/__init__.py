"""The tokenizer: a checkpoint's tokenizer.json run by the `tokenizers` library, called as the reference is.

`AutoTokenizer.from_pretrained(name_or_path)` reads tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja and generation_config.json from a local folder or a hub repo
and returns a `Tokenizer`; `StreamingDetokenizer` turns generated ids into text as they arrive.

Modules: `tokenizer` (loading, decode, special tokens), `call` (the call's options, pairs and words, `pad`),
`encoding` (the padding and truncation rules, and the encodings they shape), `batch_encoding` (the output,
its maps between characters, words and tokens, tensors and arrays), `padding` (`pad` for data collators),
`files` (reading a checkpoint), `chat_template` (sandboxed Jinja rendering), `template_budget` (its limits on
time and size), `streaming` (incremental detokenization).
"""

from .batch_encoding import BatchEncoding
from .chat_template import ChatTemplateError, ChatTemplateSecurityError, render_chat_template
from .streaming import StreamingDetokenizer
from .tokenizer import AutoTokenizer, Tokenizer

__all__ = [
    "AutoTokenizer",
    "BatchEncoding",
    "ChatTemplateError",
    "ChatTemplateSecurityError",
    "StreamingDetokenizer",
    "Tokenizer",
    "render_chat_template",
]
