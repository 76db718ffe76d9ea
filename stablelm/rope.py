"""Rotary position embeddings: inverse frequencies for every rope type, and cos/sin for given positions.

Each `_inv_freq_*` function returns `(inv_freq, attention_scaling)` and follows the reference's arithmetic
step for step (same dtypes, same order of operations), so frequencies match it bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import StableLmConfig
from .kernels.rotation import rotary
from .rope_parameters import rope_original_length


def _exponents(dim: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def _inv_freq_default(config: StableLmConfig, dim: int) -> tuple[torch.Tensor, float]:
    return 1.0 / (config.rope_theta ** _exponents(dim)), 1.0


def _inv_freq_linear(config: StableLmConfig, dim: int) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _inv_freq_default(config, dim)
    return inv_freq / config.rope_scaling["factor"], 1.0


def _inv_freq_dynamic(
    config: StableLmConfig, dim: int, seq_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: the base grows with the sequence length once it passes max_position_embeddings."""
    factor = config.rope_scaling["factor"]
    max_len = config.max_position_embeddings
    if seq_len is None:
        length: float | torch.Tensor = max_len
    else:
        length = torch.maximum(seq_len, torch.tensor(max_len, dtype=seq_len.dtype, device=seq_len.device))
    base = config.rope_theta * ((factor * length / max_len) - (factor - 1)) ** (dim / (dim - 2))
    if isinstance(base, torch.Tensor):
        return 1.0 / (base ** _exponents(dim, base.device)), 1.0
    return 1.0 / (base ** _exponents(dim)), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _inv_freq_yarn(config: StableLmConfig, dim: int) -> tuple[torch.Tensor, float]:
    params = config.rope_scaling
    base = config.rope_theta
    original = rope_original_length(config)
    factor = params.get("factor") or config.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def _longrope_attention_factor(config: StableLmConfig) -> float:
    params = config.rope_scaling
    original = rope_original_length(config)
    factor = params.get("factor") or config.max_position_embeddings / original
    if params.get("attention_factor") is not None:
        return params["attention_factor"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _inv_freq_longrope(config: StableLmConfig, dim: int, *, long: bool = False) -> tuple[torch.Tensor, float]:
    """Per-dimension rescaling: `short_factor` within the pretraining length, `long_factor` past it."""
    ext_factors = torch.tensor(
        config.rope_scaling["long_factor" if long else "short_factor"], dtype=torch.float32
    )
    inv_freq = 1.0 / (ext_factors * config.rope_theta ** _exponents(dim))
    return inv_freq, _longrope_attention_factor(config)


def _inv_freq_llama3(config: StableLmConfig, dim: int) -> tuple[torch.Tensor, float]:
    params = config.rope_scaling
    inv_freq, _ = _inv_freq_default(config, dim)
    factor, low_freq_factor, high_freq_factor = (
        params["factor"],
        params["low_freq_factor"],
        params["high_freq_factor"],
    )
    old_context_len = rope_original_length(config)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama), 1.0


_INIT_FUNCTIONS = {
    "default": _inv_freq_default,
    "linear": _inv_freq_linear,
    "dynamic": _inv_freq_dynamic,
    "yarn": _inv_freq_yarn,
    "longrope": _inv_freq_longrope,
    "llama3": _inv_freq_llama3,
}


def compute_inv_freq(config: StableLmConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, length rotary_dim / 2) and the cos/sin scaling for the config's rope type."""
    return _INIT_FUNCTIONS[config.rope_type](config, config.rotary_dim)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head, from position ids.

    The frequencies are non-persistent buffers computed in fp32, which casts of the module reach as they
    reach the reference's: `model.to(torch.bfloat16)` or `.half()` rounds them to that dtype (the angles
    are then computed from the rounded frequencies, in fp32), while `from_pretrained(..., dtype=...)`
    leaves them in fp32, as the reference's loading does. `dynamic` and `longrope` pick their frequencies
    from the largest position in each call, as the reference does, but without state carried between
    calls (after a cast, the reference's `dynamic` returns to fp32 frequencies once a long sequence has
    grown them; these stay as cast).
    """

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(0), persistent=False)
        self.attention_scaling = 1.0
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the frequencies in fp32 on `device` (default: where the buffers are now)."""
        device = device or self.inv_freq.device
        inv_freq, self.attention_scaling = compute_inv_freq(self.config)
        self.inv_freq = inv_freq.to(device)
        if self.config.rope_type == "longrope":
            self.long_inv_freq = _inv_freq_longrope(self.config, self.config.rotary_dim, long=True)[0].to(
                device
            )

    def _apply(self, fn, recurse=True):
        # Casts and moves apply to the buffers as torch applies them (the reference's are plain buffers);
        # buffers without values (meta, before loading) are computed on their new device (`to_empty`).
        unset = self.inv_freq.is_meta
        super()._apply(fn, recurse)
        if unset and not self.inv_freq.is_meta:
            self.reset_buffers(self.inv_freq.device)
        return self

    def _frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        rope_type = self.config.rope_type
        if rope_type == "dynamic":
            seq_len = position_ids.max() + 1
            if int(seq_len) > self.config.max_position_embeddings:
                return _inv_freq_dynamic(self.config, self.config.rotary_dim, seq_len)[0]
        elif rope_type == "longrope":
            seq_len = position_ids.max() + 1
            return torch.where(seq_len > rope_original_length(self.config), self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (B, T, rotary_dim), in x's dtype, for position ids of shape (B, T) (the
        reference's signature: `x` gives only the dtype)."""
        dtype = x.dtype
        inv_freq = self._frequencies(position_ids).to(device=position_ids.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, heads_dim: int = 1, native: bool = False
) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (B, H, T, D), or (B, T, H, D) with `heads_dim=2`;
    cos/sin are (B, T, rotary_dim). `native`: in inference on the CPU, in one call of stablelm's
    kernels (the same bits; saves a dozen small operations per layer and token)."""
    if native and not torch.compiler.is_compiling():
        y = rotary(x, cos, sin, heads_dim)
        if y is not None:
            return y
    rot_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)
