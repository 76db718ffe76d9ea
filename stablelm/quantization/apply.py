"""Quantizing a model: which linear layers, replacing them, and what a quantized checkpoint holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import QuantizationConfig
from .linear import QuantizedLinear

CONFIG_KEY = "quantization_config"


def _skipped(name: str, config: QuantizationConfig) -> bool:
    return any(name == skip or name.startswith(skip + ".") for skip in config.modules_to_not_convert)


def targets(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Linear]:
    """The linear layers `config` quantizes, by name: every nn.Linear (the LM head included) except the
    names it skips, and, for int4, those whose input size the group size does not divide."""
    found = {}
    for name, module in model.named_modules():
        if type(module) is QuantizedLinear or not isinstance(module, nn.Linear) or _skipped(name, config):
            continue
        if config.quant_type == "int4" and module.in_features % config.group_size:
            continue
        found[name] = module
    return found


def expected_tensors(model: nn.Module, config: QuantizationConfig) -> dict[str, torch.dtype]:
    """Checkpoint key -> dtype of every quantized tensor a checkpoint of this model and config holds."""
    out = {}
    for name in targets(model, config):
        if config.quant_type == "int8":
            out.update({f"{name}.weight": torch.int8, f"{name}.weight_scale": torch.float32})
        else:
            out.update(
                {
                    f"{name}.weight": torch.uint8,
                    f"{name}.weight_scale": torch.bfloat16,
                    f"{name}.weight_min": torch.bfloat16,
                }
            )
    return out


def replace_with_empty(model: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> list[str]:
    """Swap the target layers for meta QuantizedLinear placeholders (loading a quantized checkpoint);
    their names."""
    names = list(targets(model, config))
    for name in names:
        old = model.get_submodule(name)
        new = QuantizedLinear(
            old.in_features, old.out_features, quant_type=config.quant_type, group_size=config.group_size,
            bias=old.bias is not None, dtype=dtype, device="meta",
        )  # fmt: skip
        new.train(old.training)
        _set(model, name, new)
    model.config.extra[CONFIG_KEY] = config.to_dict()
    return names


def quantize(model: nn.Module, config: Any = "int8") -> nn.Module:
    """Quantize a loaded model's linear layers in place (weight-only: int8 or int4) and return it.

    `config`: "int8", "int4", a dict or a `QuantizationConfig`. The embeddings stay as they are; the
    LM head is quantized unless `modules_to_not_convert` names it. A model whose head shares the
    embedding's weight keeps that tie: its head is left unquantized.

    Raises:
        TypeError: `model` is not a stablelm model (transformers' own, say: its config cannot record the
            quantization, and its forward does not run these layers' way).
        ValueError: The model is already quantized, or the config is not one this package supports.
    """
    _check_model(model)
    config = QuantizationConfig.coerce(config, what="quantize() config")
    if any(type(m) is QuantizedLinear for m in model.modules()):
        raise ValueError(
            "quantize(): this model is already quantized; load the unquantized checkpoint to change format."
        )
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in targets(model, config).items():
        if id(module.weight) in tied:
            config.modules_to_not_convert.append(name)
            continue
        with torch.no_grad():
            new = QuantizedLinear.from_dense(
                module.weight.detach(), None if module.bias is None else module.bias.detach(),
                quant_type=config.quant_type, group_size=config.group_size,
            )  # fmt: skip
        new.use_kernels = getattr(module, "use_kernels", True)
        new.train(module.training)  # a model put in eval mode stays there (the planned decode step needs it)
        _set(model, name, new)
    if hasattr(model, "config"):
        model.config.extra[CONFIG_KEY] = config.to_dict()
    return model


def _check_model(model: Any) -> None:
    """quantize() changes stablelm models (or bare modules): anything else is refused before it is changed."""
    from ..config import StableLmConfig

    config = getattr(model, "config", None)
    if isinstance(model, nn.Module) and (config is None or isinstance(config, StableLmConfig)):
        return
    kind = type(model)
    raise TypeError(
        f"quantize() takes a stablelm model, got {kind.__module__}.{kind.__qualname__}. Load the checkpoint with "
        "stablelm (stablelm.AutoModelForCausalLM.from_pretrained(path), which also quantizes while loading with "
        "quantization_config='int8' or 'int4'), then quantize that."
    )


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers, each once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
