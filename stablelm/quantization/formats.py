"""The int8 and int4 weight-only formats: quantizing a dense weight, and the exact dequantized values.

- int8: `weight` int8 [N, K], `weight_scale` float32 [N]; symmetric per output channel,
  s = max|w| / 127, q = round(w / s) in -127..127, w' = q * s. (llama.cpp's Q8_0 and torchao's int8
  weight-only are symmetric too: the values of a trained layer sit around zero.)
- int4: `weight` uint8 [N, K / 2], `weight_scale` and `weight_min` bfloat16 [N, K / group]; per group
  of `group` inputs, m = min w, s = (max w - m) / 15 (both rounded to bfloat16 first), q = round((w - m) / s)
  in 0..15, w' = q * s + m. A scale and a minimum (llama.cpp's Q4_1/Q4_K, torchao's scale + zero
  point) rather than a symmetric scale: a group of 128 is rarely centred on zero, and an offset
  uses all 16 levels; a float minimum instead of an integer zero point keeps the group's extremes
  exact. Within each run of 64 inputs, byte j holds q[j] in its low nibble and q[32 + j] in its high
  nibble (the kernels read 32 consecutive inputs from 32 low nibbles).

Dequantized values are computed in float32 (q * s, then + m, each rounded), as the kernels do.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 128  # quantize this many rows at a time: float32 temporaries stay small


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 [N]) of a dense [N, K] weight."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    for r in range(0, n, ROWS_PER_CHUNK):
        w = weight[r : r + ROWS_PER_CHUNK].to(device="cpu", dtype=torch.float32)
        s = w.abs().amax(1) / 127
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q[r : r + len(w)] = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r : r + len(w)] = s
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale bfloat16 [N, K/group], min bfloat16 [N, K/group]) of a dense weight."""
    n, k = weight.shape
    if k % group or group % 64:
        raise ValueError(
            f"int4 needs the input size ({k}) to be a multiple of the group size ({group}, a multiple of 64)"
        )
    g = k // group
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, g, dtype=torch.bfloat16)
    mins = torch.empty(n, g, dtype=torch.bfloat16)
    for r in range(0, n, ROWS_PER_CHUNK):
        w = weight[r : r + ROWS_PER_CHUNK].to(device="cpu", dtype=torch.float32).view(-1, g, group)
        lo, hi = w.amin(-1), w.amax(-1)
        m = lo.to(torch.bfloat16)
        s = ((hi - m.float()) / 15).to(torch.bfloat16)
        sf = s.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        q = torch.round((w - m.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
        packed[r : r + len(w)] = pack_int4(q.view(len(w), k))
        scales[r : r + len(w)], mins[r : r + len(w)] = s, m
    return packed, scales, mins


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] bytes in the kernels' nibble order."""
    n, k = q.shape
    runs = q.view(n, k // 64, 2, 32)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K] values 0..15 (uint8)."""
    n, half = packed.shape
    runs = packed.view(n, half // 32, 1, 32)
    return torch.cat([runs & 15, runs >> 4], 2).reshape(n, half * 2)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: q * s."""
    return q.float() * scale.float()[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: q * s + m per group."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = scale.shape[1]
    w = q.view(n, g, k // g) * scale.float()[..., None]
    return (w + minimum.float()[..., None]).view(n, k)
