"""The loading options of `from_pretrained`: the device and dtype to load into, and the config to build."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..config import StableLmConfig
from .layout import CONFIG_NAME


def one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"Got {name}={value!r} and {alias}={alias_value!r}; pass only {name}.")
    return alias_value


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """The device to load onto: None is the CPU, "auto" is CUDA when available."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, dict):
        raise ValueError(
            "A device_map dict spreads a model over several devices, which this package does not do; pass one "
            "device (device='cuda', 'cpu' or 'auto')."
        )
    if device == "disk":
        raise ValueError(
            "device 'disk' offloads the weights to offload_folder, which this package does not do: it loads the "
            "whole model onto one device; pass device='cpu', 'cuda' or 'auto' (quantization_config='int8' or 'int4' "
            "makes the model smaller)."
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1' or 'auto'."
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} needs CUDA, which this torch build or machine lacks; pass 'cpu' or 'auto'."
        )
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, *, what: str = "dtype") -> torch.dtype:
    """A floating-point torch dtype from a dtype or its name ('bfloat16', 'torch.float16'); None is float32."""
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"{what} {dtype!r} is not a floating-point torch dtype; pass 'auto', a dtype such as torch.bfloat16, "
            "or a name such as 'bfloat16', 'float16' or 'float32'."
        )
    return resolved


def auto_dtype(config: StableLmConfig, stored: Any) -> torch.dtype:
    """dtype="auto": the config's `torch_dtype`, else the checkpoint's first floating-point dtype."""
    if config.torch_dtype is not None:
        return resolve_dtype(config.torch_dtype, what=f"torch_dtype in {CONFIG_NAME}")
    return next((d for d in stored if d.is_floating_point), torch.float32)


def build_config(
    folder: Path, config: StableLmConfig | None, attn_implementation: str | None, overrides: dict[str, Any]
) -> StableLmConfig:
    # transformers' own StableLmConfig is converted, as the reference takes its own
    config = StableLmConfig.from_pretrained(folder) if config is None else StableLmConfig.coerce(config)
    attn_implementation = attn_implementation or config.attn_implementation
    if overrides:
        # and the output flags, which config.json does not carry but the reference's from_pretrained sets
        flags = {"output_hidden_states", "output_attentions", "return_dict"}
        known = set(StableLmConfig().to_dict()) | {"num_labels", "id2label", "label2id"} | flags
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"from_pretrained() got unexpected keyword arguments {unknown}; besides the loading options, "
                "keyword arguments must be config fields (such as num_labels or pad_token_id)."
            )
        kept = {flag: getattr(config, flag) for flag in flags}
        config = StableLmConfig.from_dict(config.to_dict(), **{**kept, **overrides})
    else:
        config = copy.deepcopy(config)  # the model owns its config; the caller's stays as it was
    config.attn_implementation = attn_implementation
    config.validate()
    return config
