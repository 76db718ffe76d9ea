"""Quantized checkpoints: the quantization a load applies (the checkpoint's own, or the one asked for), the
dtypes a stored quantized checkpoint must hold, and quantizing a dense tensor while it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import StableLmConfig
from .layout import CONFIG_NAME, CheckpointError
from .plan import LoadPlan


def quantization_for(config: StableLmConfig, requested: Any, folder: Path) -> tuple[Any, bool]:
    """(the QuantizationConfig to apply or None, whether the checkpoint is stored quantized)."""
    stored = config.extra.get("quantization_config")
    if stored is None and requested is None:
        return None, False
    from ..quantization import QuantizationConfig

    wanted = None if requested is None else QuantizationConfig.coerce(requested)
    if stored is None:
        return wanted, False
    try:
        found = QuantizationConfig.from_dict(stored, what=f"quantization_config in {folder / CONFIG_NAME}")
    except (TypeError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    if wanted is not None and wanted.to_dict() != found.to_dict():
        raise ValueError(
            f"quantization_config={requested!r} differs from the checkpoint's own ({found.to_dict()} in "
            f"{folder / CONFIG_NAME}): a quantized checkpoint loads only as it was saved. Omit "
            "quantization_config, or quantize the unquantized checkpoint."
        )
    return found, True


QUANT_SUFFIXES = (".weight_scale", ".weight_min")


def is_quantized_key(key: str, shapes: dict) -> bool:
    if key.endswith(QUANT_SUFFIXES):
        return True
    return key.endswith(".weight") and key[: -len("weight")] + "weight_scale" in shapes


def check_quantized_dtypes(expected: dict, found: dict, plan: LoadPlan, quant: Any) -> None:
    """Refuse quantized tensors whose dtype is not the one the checkpoint's quantization_config describes."""
    wrong = []
    for key, dtype in expected.items():
        ckpt = plan.sources.get(key)
        if ckpt is not None and found[ckpt][1].dtype != dtype:
            wrong.append((ckpt, dtype, found[ckpt][1].dtype, found[ckpt][0].path))
    if wrong:
        ckpt, dtype, got, path = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path} holds {ckpt} as {str(got).removeprefix('torch.')}, but the quantization_config in "
            f"{CONFIG_NAME} ({quant.to_dict()}) describes {str(dtype).removeprefix('torch.')}{more}: the weights "
            "and their description do not belong together. Save the model again, or fix quantization_config."
        )


def quantize_tensor(
    key: str, dense: torch.Tensor, quant: Any, device: torch.device
) -> dict[str, torch.Tensor]:
    from ..quantization import formats

    prefix = key[: -len("weight")]
    if quant.quant_type == "int8":
        q, s = formats.quantize_int8(dense)
        out = {"weight": q, "weight_scale": s}
    else:
        q, s, m = formats.quantize_int4(dense, quant.group_size)
        out = {"weight": q, "weight_scale": s, "weight_min": m}
    return {prefix + name: t.to(device) for name, t in out.items()}
