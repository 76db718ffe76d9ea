"""The tokenizer's output, and the padding and truncation rules that shape it, as the reference applies them."""

from __future__ import annotations

from typing import Any

import torch

VERY_LARGE_INTEGER = int(1e30)  # the reference's model_max_length when a checkpoint sets none
_LARGE_INTEGER = int(1e20)  # a model_max_length above this means "no limit"
_PADDING = {
    False: None,
    "do_not_pad": None,
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
}
_TRUNCATION = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True}


class BatchEncoding(dict):
    """The tokenizer's output: `input_ids` and `attention_mask`, read as keys or as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {sorted(self)}.") from None

    def to(self, device: str | torch.device | int, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every tensor to `device` (in place) and return the encoding, as in `tok(...).to("cuda")`."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


def padding_and_truncation(
    padding: bool | str,
    truncation: bool | str | None,
    max_length: int | None,
    *,
    model_max_length: int,
) -> tuple[int | str | None, int | None]:
    """Resolve the options as the reference does.

    Returns:
        (what to pad to: "longest", a length, or None; the length to cut to, or None).
    """
    if padding not in _PADDING:
        raise ValueError(f"padding must be one of False, True, 'longest', 'max_length'; got {padding!r}.")
    if truncation not in _TRUNCATION:
        raise ValueError(f"truncation must be True, False or None; got {truncation!r}.")
    if max_length is not None and padding is False and truncation is None:
        truncation = True  # the reference's rule: max_length alone means truncate
    pad, truncate = _PADDING[padding], _TRUNCATION[truncation]
    if max_length is None:
        max_length = model_max_length if model_max_length <= _LARGE_INTEGER else None
        pad = None if pad == "max_length" and max_length is None else pad
        truncate = truncate and max_length is not None
    pad_to = "longest" if pad == "longest" else max_length if pad else None
    return pad_to, max_length if truncate else None


def pad(
    ids: list[list[int]], *, to: int | str, pad_id: int, side: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Pad each row to the longest row (`to="longest"`) or to a length; returns (ids, attention masks)."""
    length = max(map(len, ids), default=0) if to == "longest" else to
    padded, masks = [], []
    for row in ids:
        n = max(length - len(row), 0)
        padded.append([pad_id] * n + row if side == "left" else row + [pad_id] * n)
        masks.append([0] * n + [1] * len(row) if side == "left" else [1] * len(row) + [0] * n)
    return padded, masks


def pad_offsets(offsets: list[list[tuple[int, int]]], masks: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Offsets of padded rows: (0, 0) at each padding position, as the reference writes them."""
    padded = []
    for row, mask in zip(offsets, masks, strict=True):
        n = len(mask) - len(row)
        padded.append([(0, 0)] * n + row if mask and mask[0] == 0 else row + [(0, 0)] * n)
    return padded


def encode_rows(
    backend: Any,
    texts: list[str],
    *,
    add_special_tokens: bool,
    max_length: int | None,
    side: str,
    offsets: bool = False,
) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
    """Token ids of each text, cut to `max_length` on `side` (the special tokens kept), and with `offsets`
    the (start, end) characters of each token in its text ((0, 0) for special tokens), as the reference.

    Truncation happens here rather than through `enable_truncation` on the shared backend, so that
    concurrent calls with different options cannot see each other's settings.
    """
    added = backend.num_special_tokens_to_add(False) if add_special_tokens else 0
    encode = backend.encode_batch if offsets else backend.encode_batch_fast  # only the former has offsets
    if max_length is not None and max_length < added:
        raise ValueError(f"max_length={max_length} leaves no room for the {added} special tokens added.")
    if max_length is None or added == 0:
        encodings = encode(texts, add_special_tokens=add_special_tokens)
        if max_length is not None:
            for encoding in encodings:
                encoding.truncate(max_length, direction=side)
    else:
        encodings = encode(texts, add_special_tokens=False)
        for encoding in encodings:  # cut the text, then add the special tokens, as the backend itself does
            encoding.truncate(max_length - added, direction=side)
        encodings = [backend.post_process(encoding, None, True) for encoding in encodings]
    ids = [encoding.ids for encoding in encodings]
    return ids, [list(encoding.offsets) for encoding in encodings] if offsets else None


def batch_encoding(
    ids: list[list[int]],
    masks: list[list[int]],
    *,
    batched: bool,
    return_tensors: str | None,
    offsets: list[list[tuple[int, int]]] | None = None,
) -> BatchEncoding:
    """Lists (a single text unbatched), or (batch, length) int64 tensors for `return_tensors="pt"`; with
    `offsets`, also `offset_mapping` ((batch, length, 2) as a tensor)."""
    if return_tensors is None:
        encoding = BatchEncoding(
            input_ids=ids if batched else ids[0], attention_mask=masks if batched else masks[0]
        )
        if offsets is not None:
            encoding["offset_mapping"] = offsets if batched else offsets[0]
        return encoding
    if len({len(row) for row in ids}) > 1:
        raise ValueError(
            "Cannot make one tensor of texts with different lengths: pass padding=True (and set a pad token, "
            "e.g. tokenizer.pad_token = tokenizer.eos_token), or return_tensors=None for lists."
        )
    encoding = BatchEncoding(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(masks, dtype=torch.long)
    )
    if offsets is not None:
        encoding["offset_mapping"] = torch.tensor(offsets, dtype=torch.long).reshape(len(ids), -1, 2)
    return encoding


def _as_python(ids: Any) -> Any:
    """Token ids as Python ints and lists (tensors and arrays converted)."""
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], int):
        return [_as_python(row) for row in ids]
    return list(ids) if isinstance(ids, tuple) else ids


def decode_error(ids: Any, err: Exception) -> Exception:
    """The error for token ids the tokenizer's backend refused with `err` (a TypeError or OverflowError
    that names no argument): which id, where, and what ids must be. `ids` as `_as_python` gives them."""
    rows = ids if ids and isinstance(ids[0], list) else [ids]
    for r, row in enumerate(rows):
        for i, value in enumerate(row if isinstance(row, list) else [row]):
            where = f"position {i}" + (f" of sequence {r}" if len(rows) > 1 else "")
            if not isinstance(value, int):
                return TypeError(
                    f"token_ids must hold integer token ids; got {value!r} ({type(value).__name__}) at {where}"
                )
            if not 0 <= value < 2**32:
                return ValueError(
                    f"token_ids must hold token ids from 0 to 2**32 - 1; got {value} at {where}"
                )
    return err
