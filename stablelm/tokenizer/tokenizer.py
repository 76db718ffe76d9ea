"""`Tokenizer`: a checkpoint's tokenizer.json run by the `tokenizers` library, called as the reference is."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from ..hub import resolve_model_dir
from .call import EncodeMixin
from .encoding import VERY_LARGE_INTEGER, _as_python, decode_error
from .files import SPECIAL_TOKEN_NAMES, TOKENIZER_FILES, read_tokenizer_files
from .mixins import AddedTokensMixin, ChatMixin, TokensMixin

_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEAN_UP += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Every clean-up pattern joins a character from this set to the one after it; any other character ends
# all patterns, so text up to it cleans up the same whatever follows.
CLEAN_UP_JOINS = frozenset(" 'nvr")


def clean_up_tokenization(text: str) -> str:
    """The reference's clean-up of spaces before punctuation and in English contractions."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


# The default of `from_pretrained`'s special-token arguments: keep the checkpoint's (None removes the token).
_FROM_FILES: Any = type("FromFiles", (), {"__repr__": lambda self: "<from the checkpoint's files>"})()


def _token_text(name: str, value: str | AddedToken | None) -> str | None:
    if value is not None and not isinstance(value, (str, AddedToken)):
        raise TypeError(
            f"{name} must be a token string (or tokenizers.AddedToken) or None, not {type(value).__name__}."
        )
    return None if value is None else str(value)


class _SpecialToken:
    """A named special token as a settable attribute (`tok.pad_token`), or its id (`tok.pad_token_id`)."""

    def __init__(self, name: str, *, as_id: bool = False) -> None:
        self.name, self.as_id = name, as_id

    def __get__(self, tokenizer: Tokenizer | None, owner: type | None = None) -> Any:
        if tokenizer is None:
            return self
        token = tokenizer._special_tokens.get(self.name)
        return tokenizer.convert_tokens_to_ids(token) if self.as_id and token is not None else token

    def __set__(self, tokenizer: Tokenizer, value: str | int | None) -> None:
        if self.as_id and value is not None:
            token = tokenizer.convert_ids_to_tokens(int(value))
            if token is None:
                raise ValueError(f"{self.name}_id {value} is not in the vocabulary (size {len(tokenizer)}).")
            value = token
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{self.name} must be a token string or None, not {type(value).__name__}.")
        tokenizer._special_tokens[self.name] = value


class Tokenizer(EncodeMixin, ChatMixin, AddedTokensMixin, TokensMixin):
    """A `tokenizers` pipeline with the reference's calling convention, special tokens and chat templates.

    Load one with `AutoTokenizer.from_pretrained(...)`. Calling it encodes text; `decode`, `batch_decode` and
    `apply_chat_template` cover the rest of what the model's documentation uses.
    """

    bos_token, bos_token_id = _SpecialToken("bos_token"), _SpecialToken("bos_token", as_id=True)
    eos_token, eos_token_id = _SpecialToken("eos_token"), _SpecialToken("eos_token", as_id=True)
    unk_token, unk_token_id = _SpecialToken("unk_token"), _SpecialToken("unk_token", as_id=True)
    pad_token, pad_token_id = _SpecialToken("pad_token"), _SpecialToken("pad_token", as_id=True)
    sep_token, sep_token_id = _SpecialToken("sep_token"), _SpecialToken("sep_token", as_id=True)
    cls_token, cls_token_id = _SpecialToken("cls_token"), _SpecialToken("cls_token", as_id=True)
    mask_token, mask_token_id = _SpecialToken("mask_token"), _SpecialToken("mask_token", as_id=True)
    model_input_names = ["input_ids", "attention_mask"]  # what `pad` and tools read first
    pad_token_type_id = 0

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_special_tokens: Sequence[str] = (),
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        name_or_path: str = "",
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`.

        Args:
            backend: The pipeline, usually `tokenizers.Tokenizer.from_file("tokenizer.json")`.
            special_tokens: Named special tokens (`bos_token`, `eos_token`, ... or model-specific names).
                Tokens the backend lacks are added to it as special tokens, as the reference does.
            extra_special_tokens: Further special tokens without a name.
            model_max_length: The length `truncation=True` and `padding="max_length"` use by default.
            padding_side: "right", or "left" for batched generation.
            truncation_side: "right" keeps the start of a text, "left" its end.
            clean_up_tokenization_spaces: The default of `decode`; like the reference, never applied to BPE.
            chat_template: A Jinja chat template, or several by name (the one used by default named "default").
            generation_config: The checkpoint's generation_config.json, as read.
            name_or_path: Where the tokenizer came from.
        """
        self._backend = backend
        self._special_tokens: dict[str, str | None] = dict.fromkeys(SPECIAL_TOKEN_NAMES)
        self._special_tokens.update(special_tokens or {})
        self.extra_special_tokens = list(extra_special_tokens)
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.generation_config = dict(generation_config or {})
        self.name_or_path = name_or_path
        self._add_bos_token = self._add_eos_token = False
        known = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [
            AddedToken(t, special=True, normalized=False) for t in self.all_special_tokens if t not in known
        ]
        if missing:  # so each encodes as one token and decode can skip it
            backend.add_special_tokens(missing)
        if backend.post_processor is None:  # the reference's default, which marks each token's sequence
            self._update_post_processor()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        use_fast: bool = True,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = _FROM_FILES,  # type: ignore[assignment]
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        bos_token: str | AddedToken | None = _FROM_FILES,
        eos_token: str | AddedToken | None = _FROM_FILES,
        unk_token: str | AddedToken | None = _FROM_FILES,
        sep_token: str | AddedToken | None = _FROM_FILES,
        pad_token: str | AddedToken | None = _FROM_FILES,
        cls_token: str | AddedToken | None = _FROM_FILES,
        mask_token: str | AddedToken | None = _FROM_FILES,
        additional_special_tokens: Sequence[str | AddedToken] | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        legacy: bool | None = None,
        trust_remote_code: bool = False,
    ) -> Tokenizer:
        """Load a checkpoint's tokenizer from a local folder or a Hugging Face hub repo id.

        Args:
            name_or_path: A folder holding tokenizer.json, or a hub repo id such as
                "stabilityai/stablelm-2-zephyr-1_6b".
            revision: The hub branch, tag or commit.
            cache_dir: The hub cache folder.
            local_files_only: Use only files already in the hub cache.
            token: A hub access token.
            use_fast: Accepted so that code written for the reference runs unchanged: the tokenizer is always
                the `tokenizers` one, as the reference's is for these checkpoints whatever `use_fast` says.
            padding_side: Overrides the checkpoint's padding side ("left" for batched generation).
            truncation_side: Overrides the checkpoint's truncation side ("left" keeps the end of a text).
            model_max_length: Overrides the checkpoint's `model_max_length` (None: no limit, as the reference).
            add_bos_token: Put the bos token before every encoded text. As in the reference, the value in
                tokenizer_config.json is not used: tokenizer.json's post-processor decides.
            add_eos_token: Put the eos token after every encoded text (same rule).
            bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token: Override the
                checkpoint's special token (None removes it); a token the vocabulary lacks is added to it as a
                special token, as the reference does.
            additional_special_tokens: The checkpoint's extra special tokens replaced by these (added to the
                vocabulary where it lacks them), as the reference does.
            clean_up_tokenization_spaces: Overrides the checkpoint's setting for `decode`.
            legacy: Accepted and not used (a flag of the reference's SentencePiece tokenizers).
            trust_remote_code: Accepted so that code written for the reference runs unchanged; no code from
                the hub is ever run here.

        Raises:
            FileNotFoundError: There is no such folder or repo, or it holds no tokenizer.json.
            TypeError: A special token that is not a string.
            ValueError: A side other than "left" or "right", or a `model_max_length` that is not a positive
                integer.
        """
        del trust_remote_code, use_fast, legacy
        if model_max_length is None:  # the reference's "no limit"
            model_max_length = VERY_LARGE_INTEGER
        elif model_max_length is _FROM_FILES:
            model_max_length = None
        tokens = (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token)
        special = {
            name: _token_text(name, value)
            for name, value in zip(SPECIAL_TOKEN_NAMES, tokens, strict=True)
            if value is not _FROM_FILES
        }
        settings = _settings(
            padding_side=padding_side, truncation_side=truncation_side, model_max_length=model_max_length
        )
        folder = resolve_model_dir(
            name_or_path,
            allow_patterns=TOKENIZER_FILES,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        files = read_tokenizer_files(folder)
        files |= settings | {"special_tokens": files["special_tokens"] | special}
        tokenizer = cls(**files, name_or_path=str(name_or_path))
        if add_bos_token is not None:
            tokenizer.add_bos_token = add_bos_token
        if add_eos_token is not None:
            tokenizer.add_eos_token = add_eos_token
        if additional_special_tokens is not None:
            tokenizer.add_special_tokens({"additional_special_tokens": list(additional_special_tokens)})
        if clean_up_tokenization_spaces is not None:
            tokenizer.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        return tokenizer

    # --- attributes -------------------------------------------------------------------------------------

    @property
    def padding_side(self) -> str:
        """Where padding goes: "right", or "left" for batched generation."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self._padding_side = _check_side("padding_side", side)

    @property
    def truncation_side(self) -> str:
        """Which end truncation cuts: "right" keeps the start of a text, "left" keeps its end."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, side: str) -> None:
        self._truncation_side = _check_side("truncation_side", side)

    @property
    def add_bos_token(self) -> bool:
        """Whether encoding puts the bos token first; setting it rebuilds the post-processor."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self._update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        """Whether encoding puts the eos token last; setting it rebuilds the post-processor."""
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self._update_post_processor()

    def _update_post_processor(self) -> None:
        bos = [self.bos_token] if self._add_bos_token and self.bos_token is not None else []
        eos = [self.eos_token] if self._add_eos_token and self.eos_token is not None else []
        single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
        pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
        specials = [(t, self.convert_tokens_to_ids(t)) for t in dict.fromkeys(bos + eos)]
        self._backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials
        )

    @property
    def is_fast(self) -> bool:
        """True: the tokenizer runs `tokenizers` (what the reference calls a fast tokenizer)."""
        return True

    @property
    def backend_tokenizer(self) -> Backend:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as the reference counts it)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Every token string, added tokens included, mapped to its id."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. `{"bos_token": "<|endoftext|>", ...}`."""
        return {name: token for name, token in self._special_tokens.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named and extra special tokens, each once."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        """The ids of `all_special_tokens`."""
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )

    # --- decoding ---------------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        *,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
    ) -> str | list[str]:
        """Turn token ids back into text; a batch (2-D) gives a list of texts, as in the reference.

        Args:
            token_ids: One id, a sequence of ids, a batch of sequences, or a tensor of either.
            skip_special_tokens: Leave out special tokens (eos, pad, ...).
            clean_up_tokenization_spaces: Remove spaces before punctuation; None uses the tokenizer's
                setting. As in the reference, never applied to BPE tokenizers, where it corrupts text.
            spaces_between_special_tokens: Accepted and, as by the reference's fast tokenizers, not used: the
                `tokenizers` decoder decides the spacing.
        """
        del spaces_between_special_tokens
        ids = _as_python(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return self.batch_decode(
                ids,
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            )
        try:
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as err:
            raise decode_error(ids, err) from None
        return clean_up_tokenization(text) if self._cleans_up(clean_up_tokenization_spaces) else text

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | torch.Tensor,
        *,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
    ) -> list[str]:
        """Decode a batch of id sequences (the arguments are those of `decode`)."""
        del spaces_between_special_tokens
        rows = _as_python(sequences)
        if rows and not isinstance(rows[0], list):
            rows = [rows]  # one sequence, which the reference also accepts
        try:
            texts = self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as err:
            raise decode_error(rows, err) from None
        if self._cleans_up(clean_up_tokenization_spaces):
            return [clean_up_tokenization(text) for text in texts]
        return texts

    def _cleans_up(self, clean_up_tokenization_spaces: bool | None) -> bool:
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        # The reference skips the clean-up for BPE models, where it would delete real spaces.
        return bool(clean_up_tokenization_spaces) and type(self._backend.model).__name__ != "BPE"


class AutoTokenizer:
    """The entry point the model's documentation uses: `AutoTokenizer.from_pretrained(name_or_path)`."""

    from_pretrained = Tokenizer.from_pretrained


def _settings(**values: Any) -> dict[str, Any]:
    """`from_pretrained`'s overrides of the files' settings (those given), checked before anything is read."""
    settings = {name: value for name, value in values.items() if value is not None}
    for name in ("padding_side", "truncation_side"):
        if name in settings:
            _check_side(name, settings[name])
    length = settings.get("model_max_length", 1)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"model_max_length must be a positive integer, not {length!r}.")
    return settings


def _check_side(name: str, side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', not {side!r}.")
    return side
