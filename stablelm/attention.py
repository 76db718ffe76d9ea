"""Scaled dot-product attention with one function for every backend, and the mask it reads.

Shapes: B batch, H query heads, Hkv key/value heads, T new positions (queries), S key positions
(past + T, or all the slots of a static cache), D head dimension.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# `enable_gqa` reached scaled_dot_product_attention in torch 2.5; older releases repeat K/V instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# From torch 2.5 on, SDPA gives a query whose every key is masked zeros (and zero gradients), eager and
# compiled: the reference's SDPA output at left-padded positions. Before, NaN: those rows are opened up.
_SDPA_EMPTY_ROWS_ZERO = _SDPA_HAS_GQA


@dataclass
class AttentionMask:
    """What attention needs to know about which keys each query may see.

    Attributes:
        allowed: (B, 1, T, S) bool, True where a query may attend; None when plain causal order suffices.
        is_causal: With `allowed` None, whether the causal triangle applies (T > 1).
        key_length: Number of valid key positions (past + T); a static cache holds more slots than this.
        padding: The caller's 2-D mask (B, past + T), 1 for real tokens, when the batch is padded.
        per_query: Attend each of the T queries in its own one-query call (queries at the last T
            positions), so that the outputs are bit for bit those of decoding the tokens one at a time:
            the many-query kernels round differently in half precision. Speculative decoding checks its
            drafts this way.
        packed: `allowed` keeps packed documents apart (see `packed_mask`).
        custom: `allowed` is the caller's own 4-D mask (which flash attention cannot take).
        empty_rows: (B, 1, T, 1) bool, the queries that had no key to attend to (on left padding). As the
            reference: SDPA gives them zeros (torch >= 2.5; before, `allowed` opens them up to every key so
            that no kernel produces NaN), eager attention weighs every key alike. The hidden states at
            padded positions, and a loss that reads them, are then the reference's under either.
    """

    allowed: torch.Tensor | None
    is_causal: bool
    key_length: int
    padding: torch.Tensor | None = None
    per_query: bool = False
    packed: bool = False
    custom: bool = False
    empty_rows: torch.Tensor | None = None


def build_mask(
    padding: torch.Tensor | None, *, past: int, new: int, slots: int, device: torch.device
) -> AttentionMask:
    """Combine causal order with a 2-D padding mask (B, past + new).

    `slots` is the key length attention will see (past + new, or a static cache's size). Rows whose
    every key is masked (queries on left padding) stay so where SDPA gives them zeros, as the reference's
    SDPA does (see `AttentionMask.empty_rows`).
    """
    key_length = past + new
    if padding is not None and padding.dim() == 4:
        return _custom_mask(padding, past=past, new=new, slots=slots, device=device)
    if padding is not None:
        if padding.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {padding.shape[-1]} positions, but the cache holds {past} and the input "
                f"adds {new}: pass a mask of length {key_length} (past plus new tokens)."
            )
        # an all-ones mask is no mask (the fast causal path); a compiled graph cannot branch on values
        if not torch.compiler.is_compiling() and bool(padding.all()):
            padding = None
    if padding is None and slots == key_length and (past == 0 or new == 1):
        return AttentionMask(allowed=None, is_causal=new > 1, key_length=key_length)
    query_pos = torch.arange(past, key_length, device=device)
    allowed = torch.arange(slots, device=device)[None, :] <= query_pos[:, None]  # (T, S)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if padding is not None:
        keys = padding.to(device=device, dtype=torch.bool)
        if slots > key_length:
            keys = F.pad(keys, (0, slots - key_length), value=False)
        allowed = allowed & keys[:, None, None, :]
        empty = ~allowed.any(dim=-1, keepdim=True)
        if not _SDPA_EMPTY_ROWS_ZERO:
            allowed = allowed | empty
        return AttentionMask(
            allowed=allowed, is_causal=False, key_length=key_length, padding=padding, empty_rows=empty
        )
    return AttentionMask(allowed=allowed, is_causal=False, key_length=key_length)


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Which packed document each position belongs to, from position ids that restart per document.

    Several documents packed in one row, each with positions 0, 1, ..., are told apart where the
    position does not grow by one (as the reference's `find_packed_sequence_indices`): (B, T) segment
    numbers, or None when every row holds one document. While compiling, the segments always (a graph
    cannot branch on values; one document is then one segment).
    """
    first = position_ids[:, :1] - 1
    segments = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (B, T)
    if not torch.compiler.is_compiling() and bool((segments[:, -1] == 0).all()):
        return None
    return segments


def packed_mask(segments: torch.Tensor) -> AttentionMask:
    """Causal attention within each packed document only: a block-diagonal mask (B, 1, T, T) from the
    segment numbers of `packed_segments`, so that no document attends to another."""
    T = segments.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
    return AttentionMask(allowed=allowed[:, None], is_causal=False, key_length=T, packed=True)


def _custom_mask(
    mask: torch.Tensor, *, past: int, new: int, slots: int, device: torch.device
) -> AttentionMask:
    """A 4-D mask (B or 1, 1, new, past + new) given in place of the 2-D one, as the reference takes it
    (packed sequences, shared prefixes): bool with True where a query may attend, or floating point with
    0 there and a large negative number (such as the dtype's minimum) where it may not."""
    key_length = past + new
    if mask.shape[1] != 1 or mask.shape[2] != new or mask.shape[3] != key_length:
        raise ValueError(
            f"A 4-D attention_mask must have shape (batch, 1, {new}, {key_length}) (queries, then the cache's "
            f"{past} keys and the {new} new ones), got {tuple(mask.shape)}."
        )
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.dtype.is_floating_point:
        allowed = mask == 0
        if not torch.compiler.is_compiling() and not bool((allowed | (mask <= -1e4)).all()):
            raise ValueError(
                "A floating-point 4-D attention_mask must hold 0 where a query attends and a large negative "
                "number (the dtype's minimum) where it does not; other values (soft biases) are not supported."
            )
    else:
        raise ValueError(f"A 4-D attention_mask must be bool or floating point, got {mask.dtype}.")
    allowed = allowed.to(device)
    if slots > key_length:
        allowed = F.pad(allowed, (0, slots - key_length), value=False)
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty  # rows with no key: opened, never read
    return AttentionMask(
        allowed=allowed, is_causal=False, key_length=key_length, custom=True, empty_rows=empty
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    implementation: str,
    scale: float,
    dropout: float = 0.0,
    weights: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, H, T, D), k/v (B, Hkv, S, D); returns (B, T, H, D).

    With a `weights` list, the eager path runs (whatever `implementation` says, as only it forms the
    probabilities) and appends them (B, H, T, S) to the list: the reference's `output_attentions`.
    """
    if mask.per_query and q.shape[2] > 1:
        return _query_by_query(
            q, k, v, mask, weights, implementation=implementation, scale=scale, dropout=dropout
        )
    if weights is not None:
        implementation = "eager"
    groups = q.shape[1] // k.shape[1]
    if k.shape[2] > mask.key_length and (mask.allowed is None or mask.allowed.shape[-1] == mask.key_length):
        k, v = k[:, :, : mask.key_length], v[:, :, : mask.key_length]  # a static cache's written slots
    if implementation == "flash_attention_2":
        if mask.custom:
            raise ValueError("flash_attention_2 takes 2-D padding masks only; use sdpa for a 4-D mask.")
        return _flash_attention(q, k, v, mask, scale=scale, dropout=dropout)
    compiled_cpu = torch.compiler.is_compiling() and q.device.type == "cpu"
    if q.shape[2] == 1 and dropout == 0.0 and weights is None and (k.dtype != q.dtype or compiled_cpu):
        # One new token, attended in (at least) float32 and rounded once: over a float32 cache under a
        # half-precision model (see `stablelm.fast`), or in a compiled CPU decode step, over every slot
        # of the static cache, as two products Inductor fuses with the masking and the softmax
        # (PyTorch's CPU flash kernel, run per head, took a quarter of a 160M step; within rounding of
        # the eager path, as the rest of the compiled step is).
        wide = torch.promote_types(k.dtype, torch.float32)
        return _one_query_attention(q.to(wide), k.to(wide), v.to(wide), mask.allowed, scale).to(q.dtype)
    if implementation == "sdpa" and q.shape[2] == 1 and dropout == 0.0 and not compiled_cpu:
        out = _native_one_query(q, k, v, mask, scale)  # SDPA's bits by a native kernel where one has them
        if out is not None:
            return out
    if k.dtype != q.dtype:  # prefill over a float32 cache: exact, it holds values of the model's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    if implementation == "eager" or (groups > 1 and not _SDPA_HAS_GQA):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if implementation == "eager":
        scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, T, S)
        if mask.allowed is not None:
            # the reference adds a mask of 0 / the dtype's min: masked scores become the min, and a row whose
            # every key is masked weighs them alike, its gradients still reaching q and k as the reference's
            # do (see AttentionMask.empty_rows)
            bias = torch.zeros(mask.allowed.shape, dtype=scores.dtype, device=scores.device)
            bias = bias.masked_fill(~mask.allowed, torch.finfo(scores.dtype).min)
            if mask.empty_rows is not None:
                bias = bias.masked_fill(mask.empty_rows, torch.finfo(scores.dtype).min)
            scores = scores + bias
        elif mask.is_causal:
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        if weights is not None:
            weights.append(probs)
        return torch.matmul(probs, v).transpose(1, 2)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.allowed, dropout_p=dropout, is_causal=mask.is_causal, scale=scale, **gqa
    )
    return out.transpose(1, 2)


def _native_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor | None:
    """One bfloat16 query per row over (a slice of) a contiguous CPU cache by `stablelm.kernels.attention`
    where it reproduces `F.scaled_dot_product_attention` on this machine (AVX2 CPUs); None elsewhere."""
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype or q.device.type != "cpu":
        return None
    if mask.is_causal or (mask.allowed is not None and mask.allowed.dtype != torch.bool):
        return None
    from .kernels import attention as native

    B, H, _, D = q.shape
    Hkv, length = k.shape[1], k.shape[2]
    fn = native.plan(q.dtype, H, Hkv, D, scale)
    if fn is None or H % Hkv or q.stride(3) != 1:
        return None
    base = None
    for t in (k, v):  # a leading slice of (B, Hkv, slots, D) contiguous: slots = stride(1) / D
        slots = t.stride(1) // D
        if t.stride(3) != 1 or t.stride(2) != D or t.stride(1) != slots * D or t.stride(0) != Hkv * slots * D:
            return None
        base = slots if base is None else base
        if slots != base or t.shape != k.shape:
            return None
    rows = None
    if mask.allowed is not None:
        allowed = mask.allowed
        if allowed.dim() != 4 or allowed.shape[1:3] != (1, 1) or allowed.shape[-1] != length:
            return None
        rows = allowed[:, 0, 0, :]
        if rows.stride(-1) != 1 or rows.shape[0] not in (1, B):
            return None
        if rows.shape[0] != B:
            rows = rows.expand(B, length)  # one row for all: stride 0
    out = torch.empty(B, H * D, dtype=q.dtype)
    if native.run(fn, q, k, v, length, rows, out, scale, slots=base) != 0:
        return None  # a score that is not finite: torch's kernel answers
    return out.view(B, 1, H, D)


def _query_by_query(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    weights: list[torch.Tensor] | None,
    **kwargs: object,
) -> torch.Tensor:
    """`attention` of each query alone over the keys up to its own position, as a decode step runs it.
    With `weights`, each query's probabilities (B, H, 1, its keys) are zero-padded to `key_length` (the
    keys it may not see) and appended together (B, H, T, key_length)."""
    T = q.shape[2]
    first = mask.key_length - T
    outputs = []
    rows: list[torch.Tensor] | None = [] if weights is not None else None
    for i in range(T):
        length = first + i + 1
        one = AttentionMask(
            allowed=None if mask.allowed is None else mask.allowed[:, :, i : i + 1, :length],
            is_causal=False,
            key_length=length,
            padding=None if mask.padding is None else mask.padding[:, :length],
        )
        outputs.append(attention(q[:, :, i : i + 1], k, v, one, weights=rows, **kwargs))
    if weights is not None:
        weights.append(torch.cat([F.pad(w, (0, mask.key_length - w.shape[-1])) for w in rows], dim=2))
    return torch.cat(outputs, dim=1)


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D) over k/v (B, Hkv, S, D); returns (B, 1, H, D).

    Two batched products with the query heads grouped by the K/V head they share (no repeated K/V): on
    the CPU, for many heads, faster than the flash kernel, which runs two small GEMMs per head.
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scores = torch.matmul(q.reshape(B, Hkv, H // Hkv, D), k.transpose(2, 3)) * scale  # (B, Hkv, G, S)
    if allowed is not None:  # (B, 1, 1, S)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, Hkv, G, D)
    return out.reshape(B, 1, H, D)


def check_flash_attention_available() -> None:
    """Raise ImportError saying what to install when the flash_attn package is missing."""
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash_attn package (pip install flash-attn "
            "--no-build-isolation) on a CUDA machine; use attn_implementation='sdpa' otherwise."
        )


def _check_flash_inputs(q: torch.Tensor) -> None:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"flash_attention_2 runs on CUDA in float16 or bfloat16; this model is on {q.device.type} in "
            f"{q.dtype}. Load it with dtype=torch.bfloat16 on a CUDA device, or use attn_implementation='sdpa'."
        )


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, *, scale: float, dropout: float
) -> torch.Tensor:
    _check_flash_inputs(q)
    if mask.packed:
        raise ValueError(
            "position_ids that restart inside a row (packed documents) are not supported with "
            "attn_implementation='flash_attention_2' yet; use attn_implementation='sdpa', which keeps the "
            "documents apart with a block-diagonal mask."
        )
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    k, v = k[:, :, : mask.key_length], v[:, :, : mask.key_length]  # drop unwritten static-cache slots
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|S, H, D)
    causal = q.shape[1] > 1
    if mask.padding is None:
        return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=causal)
    batch, new = q.shape[:2]
    q_keep = mask.padding[:, -new:].to(torch.bool)
    k_keep = mask.padding.to(torch.bool)
    q_idx, cu_q, max_q = _unpad_index(q_keep)
    k_idx, cu_k, max_k = _unpad_index(k_keep)
    out = flash_attn_varlen_func(
        q.reshape(-1, *q.shape[2:])[q_idx],
        k.reshape(-1, *k.shape[2:])[k_idx],
        v.reshape(-1, *v.shape[2:])[k_idx],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=causal,
    )
    full = out.new_zeros(batch * new, *out.shape[1:])
    full[q_idx] = out
    return full.view(batch, new, *out.shape[1:])


def _unpad_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices of kept positions, cumulative lengths (int32, B + 1) and the longest row."""
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_lengths = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_lengths, int(lengths.max())
