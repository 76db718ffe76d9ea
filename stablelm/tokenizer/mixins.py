"""Parts of `Tokenizer` kept in their own file: chat templates, token strings, adding tokens / saving.

They read the tokenizer's state (`_backend`, `_special_tokens`, `chat_template`, ...) and call its
encoding methods; `Tokenizer` inherits them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import AddedToken

from .batch_encoding import BatchEncoding, as_tensors
from .chat_template import render_chat_template, select_chat_template
from .encoding import _as_python
from .generation_spans import GENERATION_TAG, assistant_mask, render_with_generation_spans


class ChatMixin:
    """`get_chat_template` and `apply_chat_template`."""

    # --- chat -------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, *, tools: Sequence | None = None) -> str:
        """The template to use: `chat_template` (a Jinja template, or the name of one) or the tokenizer's.

        Raises:
            ValueError: There is no template, or there are several, none named "default" and none chosen.
        """
        return select_chat_template(self.chat_template, chat_template, tools=tools)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = True,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_assistant_tokens_mask: bool = False,
        **template_kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | BatchEncoding:
        """Format a conversation (or a batch of them) with the chat template, as the reference does.

        Args:
            messages: A list of `{"role": ..., "content": ...}` dicts, or a list of such lists.
            add_generation_prompt: End with the header that starts the assistant's reply.
            continue_final_message: Leave the final message open, so the model continues it.
            tokenize: Return token ids; False returns the rendered text.
            return_tensors: "pt" (or "np") for a (batch, length) int64 tensor (or array), None for lists.
            return_dict: Return the whole `BatchEncoding` (`input_ids` and `attention_mask`), as the reference
                (5.x) does by default; False returns only the ids (a list, or a tensor with `return_tensors`).
            chat_template: A Jinja template, or the name of one of the tokenizer's templates.
            tools: Tool descriptions (JSON schemas) for templates that support tool use.
            documents: Documents (dicts) for templates that support retrieval.
            padding: Padding of a batch (see `__call__`).
            truncation: Truncation (see `__call__`).
            max_length: The length for padding and truncation (see `__call__`).
            return_assistant_tokens_mask: Also return `assistant_masks`: 1 for the tokens of the template's
                `{% generation %}` blocks (the assistant's text), else 0; all 0 for a template without such
                blocks. Needs `return_dict=True` and `tokenize=True`; not with padding or truncation here.
            **template_kwargs: Further variables for the template.

        Raises:
            ValueError: Both `add_generation_prompt` and `continue_final_message`, an empty conversation,
                or no chat template.
            ChatTemplateError: The template raised an error (its message is passed on), failed, is not valid
                Jinja, or went over its budget of time and size (see `render_chat_template`).
            ChatTemplateSecurityError: The template tried to reach outside the sandbox.
        """
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise TypeError("tools must be JSON-schema dicts, one per tool.")
        if documents is not None and not all(isinstance(document, Mapping) for document in documents):
            raise TypeError("documents must be dicts, such as {'title': ..., 'text': ...}.")
        if return_assistant_tokens_mask:
            _check_mask_request(return_dict, tokenize, continue_final_message, padding, truncation)
        template = self.get_chat_template(chat_template, tools=tools)
        if return_assistant_tokens_mask and not GENERATION_TAG.search(template):
            warnings.warn(
                "return_assistant_tokens_mask=True but the chat template has no {% generation %} blocks: every "
                "token's mask is 0.",
                UserWarning,
                stacklevel=2,
            )
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        variables = {**self.special_tokens_map, **template_kwargs}
        variables.update({k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None})
        conversations = messages if batched else [messages]
        if return_assistant_tokens_mask:
            rendered = [
                render_with_generation_spans(
                    template, conversation, add_generation_prompt=add_generation_prompt, variables=variables
                )
                for conversation in conversations
            ]
            texts = [text for text, _ in rendered]
        else:
            texts = [
                render_chat_template(
                    template,
                    conversation,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    variables=variables,
                )
                for conversation in conversations
            ]
        if not tokenize:
            return texts if batched else texts[0]
        encoding = self(
            texts if batched else texts[0],
            return_tensors=return_tensors,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,  # the template writes the special tokens itself
        )
        if return_assistant_tokens_mask:
            offsets = [e.offsets for e in self._backend.encode_batch(texts, add_special_tokens=False)]
            masks = [assistant_mask(o, spans) for o, (_, spans) in zip(offsets, rendered, strict=True)]
            if return_tensors is not None:
                encoding["assistant_masks"] = as_tensors({"masks": masks}, return_tensors)["masks"]
            else:
                encoding["assistant_masks"] = masks if batched else masks[0]
        return encoding if return_dict else encoding["input_ids"]


def _check_mask_request(
    return_dict: bool, tokenize: bool, continue_final_message: bool, padding: bool | str, truncation: Any
) -> None:
    if not (return_dict and tokenize):
        raise ValueError(
            "`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`"
        )
    if continue_final_message:
        raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
    if padding not in (False, "do_not_pad") or truncation not in (None, False, "do_not_truncate"):
        raise ValueError(
            "return_assistant_tokens_mask is supported without padding and truncation: pad or cut the "
            "input_ids and assistant_masks together afterwards."
        )


class TokensMixin:
    """Token strings: `tokenize`, `convert_ids_to_tokens`, `convert_tokens_to_ids`."""

    def tokenize(self, text: str, pair: str | None = None, *, add_special_tokens: bool = False) -> list[str]:
        """The token strings of `text` (and of `pair`, for a tokenizer with a pair template), as the
        reference's `tokenize`; special tokens only with `add_special_tokens`."""
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            raise TypeError(f"tokenize takes a string (and an optional pair string), not {text!r:.80}.")
        return self._backend.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor:
        """Encode one text (or a pair of texts) to its token ids (the arguments are those of `__call__`)."""
        encoding = self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        return encoding["input_ids"]

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], *, skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """The token string of each id (None for an id outside the vocabulary)."""
        ids = _as_python(ids)
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in ids if i not in skip]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join token strings into text with the tokenizer's decoder (byte-level tokens back to UTF-8), as the
        reference does; without a decoder, with spaces between them."""
        if isinstance(tokens, str) or not all(isinstance(token, str) for token in tokens):
            raise TypeError(f"convert_tokens_to_string takes a list of token strings, not {tokens!r:.80}.")
        decoder = self._backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of each token string; the unk token's id (or None) for strings not in the vocabulary."""
        if not isinstance(tokens, str):
            return [self.convert_tokens_to_ids(token) for token in tokens]
        found = self._backend.token_to_id(tokens)
        unk = self._special_tokens.get("unk_token")
        return found if found is not None or unk is None else self._backend.token_to_id(unk)


class AddedTokensMixin:
    """`add_tokens`, `add_special_tokens` and `save_pretrained`."""

    def add_tokens(
        self, new_tokens: str | AddedToken | Sequence[str | AddedToken], *, special_tokens: bool = False
    ) -> int:
        """Add tokens to the vocabulary (those it lacks get the next ids), as the reference does.

        An added token is never split by encoding. Resize the model's embeddings afterwards:
        `model.resize_token_embeddings(len(tokenizer))`.

        Args:
            new_tokens: A token string or `tokenizers.AddedToken`, or a list of them.
            special_tokens: Mark them special: matched before normalisation, and left out by
                `decode(..., skip_special_tokens=True)`.

        Returns:
            The number of tokens that were new to the vocabulary.
        """
        tokens = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        for token in tokens:
            if not isinstance(token, (str, AddedToken)) or not str(token):
                raise TypeError(f"Tokens to add must be non-empty strings or AddedToken, got {token!r}.")
        if special_tokens:
            tokens = [_special(token) for token in tokens]
            return self._backend.add_special_tokens(tokens)
        return self._backend.add_tokens(tokens)

    def add_special_tokens(
        self,
        special_tokens_dict: Mapping[str, str | AddedToken | Sequence[str | AddedToken]],
        *,
        replace_extra_special_tokens: bool = True,
    ) -> int:
        """Set named special tokens (`pad_token`, ...) and extra ones, adding those the vocabulary lacks.

        For a chat fine-tune: `tokenizer.add_special_tokens({"extra_special_tokens": ["<|user|>",
        "<|assistant|>"]})`, then `model.resize_token_embeddings(len(tokenizer))`.

        Args:
            special_tokens_dict: Keys are the named tokens (`bos_token`, `eos_token`, `unk_token`, `sep_token`,
                `pad_token`, `cls_token`, `mask_token`, or another name the tokenizer already has) and
                `extra_special_tokens` (or its older name `additional_special_tokens`) with a list of tokens.
            replace_extra_special_tokens: Replace the list of extra special tokens (the old ones stay in the
                vocabulary) rather than extend it.

        Returns:
            The number of tokens that were new to the vocabulary.

        Raises:
            ValueError: An unknown key, or a value that is not a token (or a list of tokens for the extras).
        """
        tokens = dict(special_tokens_dict)
        if "additional_special_tokens" in tokens and not tokens.get("extra_special_tokens"):
            tokens["extra_special_tokens"] = tokens.pop("additional_special_tokens")
        unknown = sorted(set(tokens) - set(self._special_tokens) - {"extra_special_tokens"})
        if unknown:
            raise ValueError(
                f"Unknown special token name(s) {unknown}; use one of {sorted(self._special_tokens)} or "
                "'extra_special_tokens' (a list) for tokens without a name."
            )
        to_add: list[AddedToken] = []  # in the order given, which decides the new ids (as in the reference)
        for name, value in tokens.items():
            if name == "extra_special_tokens":
                to_add += self._set_extra_special_tokens(value, replace=replace_extra_special_tokens)
                continue
            if not isinstance(value, (str, AddedToken)):
                raise ValueError(f"{name} must be a token string or AddedToken, got {value!r}.")
            self._special_tokens[name] = str(value)
            to_add.append(_special(value))
        added = self.add_tokens(to_add, special_tokens=True)
        if self._add_bos_token or self._add_eos_token:  # the bos/eos may have changed
            self._update_post_processor()
        return added

    def _set_extra_special_tokens(self, tokens: object, *, replace: bool) -> list[AddedToken]:
        if isinstance(tokens, (str, AddedToken)) or not all(isinstance(t, (str, AddedToken)) for t in tokens):
            raise ValueError(f"extra_special_tokens must be a list of token strings, got {tokens!r}.")
        new = [t for t in tokens if replace or str(t) not in self.extra_special_tokens]
        strings = [str(t) for t in new]
        self.extra_special_tokens = strings if replace and new else [*self.extra_special_tokens, *strings]
        return [_special(t) for t in new]

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `save_directory`.

        `Tokenizer.from_pretrained` and the reference's `AutoTokenizer.from_pretrained` read them back with
        the same vocabulary, added tokens, special tokens and chat template. Each file is replaced
        atomically; chat-template files of an earlier tokenizer in the folder are removed.

        Returns:
            The paths of the files written.
        """
        from .save import save_tokenizer

        return save_tokenizer(self, save_directory)


def _special(token: str | AddedToken) -> AddedToken:
    """A special AddedToken, matched on the raw text (as the reference adds special tokens)."""
    if isinstance(token, AddedToken):
        token.special = True
        return token
    return AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
