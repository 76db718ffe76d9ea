"""`Tokenizer.pad`: padding rows that were encoded earlier, as the reference's `pad` does it for data collators.

The rules are the reference's, kept where they surprise: a batch given as tensors comes back as tensors,
`return_attention_mask=False` leaves an existing mask unpadded, and keys other than the four it pads (such as
`labels`) pass through untouched, to be made into tensors only if their rows already have one length.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence, Sized
from typing import Any

import torch

from .batch_encoding import BatchEncoding, as_tensors
from .encoding import Shape

_PAD_VALUES = (("token_type_ids", 0), ("special_tokens_mask", 1))  # besides input_ids and attention_mask


def pad_features(
    encoded: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    shape: Shape,
    side: str,
    pad_id: int | None,
    return_attention_mask: bool | None,
    return_tensors: str | None,
) -> BatchEncoding:
    """Pad one example or a batch of them; see `Tokenizer.pad`."""
    features = _columns(encoded)
    masks = features.get("attention_mask")
    kept_masks = None  # per-example masks of 2 or more dims (4-D attention masks) are stacked, not padded
    if isinstance(masks, list) and masks and getattr(masks[0], "ndim", 0) > 1:
        kept_masks = features.pop("attention_mask")
    if "input_ids" not in features:
        raise ValueError(
            "pad needs `input_ids` in the encoding or in each example of the list; got the keys "
            f"{list(features)}."
        )
    ids = features["input_ids"]
    if ids is None or (isinstance(ids, Sized) and len(ids) == 0):
        if return_attention_mask:
            features["attention_mask"] = []
        return BatchEncoding(features)
    first = _first_element(ids)
    if not isinstance(first, (int, list, tuple)):
        return_tensors = return_tensors or _tensor_type(first)
        features = {key: _as_python(value) for key, value in features.items()}
    if shape.pad_to is not None and pad_id is None:
        raise ValueError(
            "Asked to pad, but the tokenizer has no pad token. Set one first, for example "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    ids = features["input_ids"]
    options = {
        "multiple": shape.multiple,
        "side": side,
        "pad_id": pad_id,
        "mask": return_attention_mask is not False,
    }
    if ids and not isinstance(ids[0], (list, tuple)):  # one example
        return BatchEncoding(as_tensors(_pad_row(features, shape.pad_to, **options), return_tensors))
    sizes = {key: len(value) if isinstance(value, Sized) else None for key, value in features.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pad needs the same number of rows in every field; got {sizes}.")
    length = max(map(len, ids)) if shape.pad_to == "longest" else shape.pad_to
    out: dict[str, list] = {}
    for i in range(len(ids)):
        for key, value in _pad_row({k: v[i] for k, v in features.items()}, length, **options).items():
            out.setdefault(key, []).append(value)
    if kept_masks is not None:
        out["attention_mask"] = _stack(kept_masks)
    return BatchEncoding(as_tensors(out, return_tensors))


def _columns(encoded: Any) -> dict[str, Any]:
    """A dict of fields, from a dict or from a list of examples (each a dict), as a collator gets them."""
    if isinstance(encoded, (list, tuple)) and encoded and isinstance(encoded[0], Mapping):
        keys = list(encoded[0].keys())
        for i, example in enumerate(encoded):
            if not isinstance(example, Mapping) or not all(key in example for key in keys):
                raise ValueError(
                    f"pad needs every example to be a dict with the keys of the first, {keys}; example {i} is "
                    f"{type(example).__name__}"
                    + (f" with the keys {list(example)}." if isinstance(example, Mapping) else ".")
                )
        return {key: [example[key] for example in encoded] for key in keys}
    if isinstance(encoded, Mapping):
        return dict(encoded)
    raise TypeError(
        "pad takes an encoding (a dict of lists, tensors or arrays) or a list of such dicts, not "
        f"{type(encoded).__name__}."
    )


def _first_element(ids: Any) -> Any:
    first = ids[0]
    if isinstance(first, (list, tuple)):  # the first row may be empty: look for a value in any row
        for row in ids:
            if len(row) != 0:
                return row[0]
    return first


def _tensor_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "pt"
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):  # np.generic: one example's array
        return "np"
    raise ValueError(
        f"pad takes ids as Python ints, torch tensors or NumPy arrays; got {type(value).__name__} ({value!r:.40})."
    )


def _as_python(value: Any) -> Any:
    """Tensors and arrays (also inside lists) as Python lists and numbers, as the reference's `to_py_obj`."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Mapping):
        return {key: _as_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        np = sys.modules.get("numpy")
        numbers = (int, float, np.number) if np is not None else (int, float)
        if all(isinstance(item, numbers) for item in value):
            return list(value)
        return [_as_python(item) for item in value]
    return value.tolist() if hasattr(value, "tolist") else value


def _pad_row(
    row: dict[str, Any], pad_to: int | str | None, *, multiple: int | None, side: str, pad_id: int, mask: bool
) -> dict[str, Any]:
    """One example padded to `pad_to` ("longest": its own length, rounded to `multiple`)."""
    ids = row["input_ids"]
    length = len(ids) if pad_to == "longest" else pad_to
    if length is not None and multiple is not None and length % multiple:
        length += multiple - length % multiple
    if mask and "attention_mask" not in row:
        row["attention_mask"] = [1] * len(ids)
    if pad_to is None or len(ids) == length:
        return row
    n = max(length - len(ids), 0)
    fills = [("attention_mask", 0)] if mask else []
    for key, value in [*fills, *_PAD_VALUES, ("input_ids", pad_id)]:
        if key in row:
            row[key] = [value] * n + row[key] if side == "left" else row[key] + [value] * n
    return row


def _stack(masks: list[Any]) -> Any:
    if isinstance(masks[0], torch.Tensor):
        return torch.stack(masks)
    np = sys.modules["numpy"]  # an array with `ndim`, so NumPy is loaded
    return np.stack(masks) if isinstance(masks[0], np.ndarray) else np.array(masks)
