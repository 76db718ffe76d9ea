"""Train a byte-level BPE tokenizer (GPT-NeoX style) on text with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..tokenizer import Tokenizer
from ..tokenizer.encoding import VERY_LARGE_INTEGER
from .data import check_text

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
MAX_VOCAB_SIZE = 2**32  # the tokenizers library's token ids are 32-bit


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    extra_special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Learn a byte-level BPE vocabulary from `texts`.

    Any text encodes (every byte has a token) and decodes back exactly. The special tokens come first:
    `<|endoftext|>` (id 0: bos, eos and unk, as in GPT-NeoX), `<|padding|>` (id 1: pad), then
    `extra_special_tokens`. Training is deterministic: the same texts give the same tokenizer.

    Args:
        texts: The training documents.
        vocab_size: Size of the vocabulary, special tokens included (at least 256 bytes plus the specials).
        min_frequency: A pair must occur this often to be merged.
        model_max_length: The longest input the model takes, saved for `truncation=True`.
        extra_special_tokens: Further special tokens (chat roles, say).

    Returns:
        The tokenizer; `save_pretrained(folder)` writes tokenizer.json and tokenizer_config.json.

    Raises:
        ValueError: The vocabulary is too small for the byte alphabet and the special tokens (or larger than
            32-bit ids allow), or a text holds a lone surrogate (see `data.check_text`).
    """
    specials = list(dict.fromkeys([END_OF_TEXT, PADDING, *extra_special_tokens]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level vocabulary needs {len(alphabet)} byte tokens plus "
            f"{len(specials)} special tokens; use at least {len(alphabet) + len(specials)} (a few thousand is usual)."
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too large: token ids are 32-bit, so at most {MAX_VOCAB_SIZE:,} (a few "
            "thousand to a few hundred thousand is usual)."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}.")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    texts = list(texts)
    check_text(texts)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend,
        special_tokens={
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "pad_token": PADDING,
        },
        extra_special_tokens=specials[2:],
        model_max_length=model_max_length or VERY_LARGE_INTEGER,
    )
