"""LoRA adapters through peft: add them for training, save and restore them, apply or merge them.

The adapters are peft's own (`LoraConfig`, `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained`,
`merge_and_unload`): an adapter folder a run writes (adapter_config.json and adapter_model.safetensors)
loads with peft onto the reference's `StableLmForCausalLM` as it is, since the module names are the
checkpoint's. The adapter is made with `task_type=None`: peft's CAUSAL_LM wrapper calls generation hooks
(`prepare_inputs_for_generation`) that a model needs only to generate through the wrapper; training, saving,
loading and merging need none of them, and the adapter files are the same.

peft is optional (`pip install 'stablelm[lora]'`); `require_peft` says so when it is missing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def require_peft() -> Any:
    """The peft module, or an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA adapters need the peft library: pip install 'stablelm[lora]' (or pip install peft)."
        ) from err
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's shape: rank `r`, scale `alpha / r`, dropout on its input, and the layers it adapts.

    `alpha` None is twice the rank (TRL's defaults, r 16 and alpha 32, have that ratio).
    """

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"The LoRA rank must be an integer >= 1, got {self.r!r} (--lora-r).")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"The LoRA alpha must be positive, got {self.alpha!r} (--lora-alpha).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"The LoRA dropout must be in [0, 1), got {self.dropout!r} (--lora-dropout).")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"--lora-target needs layer names such as {','.join(DEFAULT_TARGETS)}, got {self.targets!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.lora_alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.r if self.alpha is None else self.alpha)


def add_lora(model: nn.Module, settings: LoraSettings, *, base_model: str | None = None) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters on `settings.targets`; only the adapters train.

    Raises:
        ImportError: peft is not installed.
        ValueError: A target names no linear layer of the model (the message lists those it has).
    """
    peft = require_peft()
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    unknown = [target for target in settings.targets if target not in linear]
    if unknown:
        raise ValueError(
            f"--lora-target {','.join(unknown)}: the model has no such layer; its linear layers are "
            f"{','.join(linear)}."
        )
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        task_type=None,
        base_model_name_or_path=base_model,
    )
    return peft.get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """A peft model's adapter settings as JSON values (rank, alpha, dropout, targets), to compare runs by."""
    config = model.peft_config["default"]
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
    }


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft model, named as in adapter_model.safetensors."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def read_adapter_state(
    folder: Path, *, model: nn.Module, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter weights saved in `folder` (on `device`, default the model's), checked against `model`'s
    adapters (names and shapes; those of a sharded model are its whole shapes).

    Raises:
        stablelm.CheckpointError: The folder has no adapter, or one of another shape or on other layers.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}): it was written by a full fine-tuning run. "
            "Resume it without --lora-r, or start the LoRA run in another --output-dir."
        )
    try:
        saved = load_file(path, device=str(model.device if device is None else device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); delete that checkpoint or start afresh.") from err
    expected = adapter_state(model)
    mismatch = sorted(set(saved) ^ set(expected)) or [
        name for name, tensor in expected.items() if saved[name].shape != tensor.shape
    ]
    if mismatch:
        raise CheckpointError(
            f"The adapter in {folder} does not fit this run's (e.g. {mismatch[0]}): resume with the --lora-r and "
            "--lora-target that run used."
        )
    return saved


def model_state_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights named as in adapter_model.safetensors, renamed to the peft model's own state-dict
    names (with the adapter's name, "default"), for loading with `load_state_dict(strict=False)` or
    torch.distributed's `set_model_state_dict`."""
    name = next(iter(model.peft_config))
    own = {key.replace(f".{name}.", "."): key for key in model.state_dict() if ".lora_" in key}
    return {own[key]: tensor for key, tensor in state.items()}


@dataclass
class GatheredAdapter:
    """A sharded peft model's adapter weights gathered whole, saved as the model would save its adapter."""

    model: nn.Module
    state: dict[str, torch.Tensor]  # named as in the peft model's state dict

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.state.values())).dtype

    def to(self, dtype: torch.dtype) -> GatheredAdapter:
        return GatheredAdapter(self.model, {name: t.to(dtype) for name, t in self.state.items()})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.model.save_pretrained(str(directory), state_dict=self.state)


def gather_adapter(model: nn.Module) -> GatheredAdapter:
    """The adapter weights of a peft model that FSDP shards, whole, on the CPU. Every rank must call it (each
    tensor is gathered from all ranks, in the same order)."""
    state = {}
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            whole = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            state[name] = whole.detach().cpu()
    return GatheredAdapter(model, state)


def merged(model: nn.Module) -> nn.Module:
    """A copy of the base model with the adapters added into its weights (the peft model is left as it is)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def apply_adapter(model: nn.Module, path: str | os.PathLike, *, merge: bool = True) -> nn.Module:
    """`model` with the peft adapter in folder `path` applied: merged into its weights (the default, for
    the speed of a plain model) or left as a peft model.

    Raises:
        ImportError: peft is not installed.
        ValueError: `path` is not an adapter folder, or its adapter does not fit the model (named "--adapter").
    """
    peft = require_peft()
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        what = "does not exist" if not folder.exists() else f"has no {ADAPTER_CONFIG}"
        raise ValueError(
            f"--adapter {str(path)!r} {what}: pass a LoRA adapter folder (what 'stablelm train --lora-r' or "
            "peft's save_pretrained writes)."
        )
    try:
        adapted = peft.PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:300]
        raise ValueError(
            f"--adapter {str(path)!r} does not fit this model ({type(err).__name__}: {reason}); pass the adapter "
            "trained on this model (-m)."
        ) from None
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    saved = set(load_file(weights)) if weights.is_file() else set()
    # peft only warns of saved weights it found no layer for (an adapter of a deeper model, say)
    unused = sorted(saved - set(adapter_state(adapted)))
    if not saved or unused:
        detail = f"{unused[0]} fits no layer of it" if unused else f"it has no {ADAPTER_WEIGHTS}"
        raise ValueError(
            f"--adapter {str(path)!r} does not fit this model ({detail}); pass the adapter trained on this "
            "model (-m)."
        )
    return adapted.merge_and_unload() if merge else adapted


def describe_adapter(path: str | os.PathLike, *, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """An adapter folder's settings and size, read from its files (no weights loaded), checked against the
    shapes of the model's stored weights.

    Returns:
        {"path", "r", "lora_alpha", "lora_dropout", "target_modules", "layers", "parameters"}.

    Raises:
        ValueError: `path` is not an adapter folder, or its adapter does not fit the weights (named "--adapter").
    """
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        missing = ADAPTER_CONFIG if not config_path.is_file() else ADAPTER_WEIGHTS
        raise ValueError(
            f"--adapter {str(path)!r} {'does not exist' if not folder.exists() else f'has no {missing}'}: pass a "
            "LoRA adapter folder (what 'stablelm train --lora-r' or peft's save_pretrained writes)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        with safe_open(weights, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, SafetensorError) as err:
        raise ValueError(f"--adapter {str(path)!r} is damaged ({err}).") from None
    layers = set()
    for key, shape in shapes.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        target = weight_shapes.get(f"{module}.weight")
        fits = target is not None and len(shape) == 2 and len(target) == 2
        if fits:
            fits = shape[1] == target[1] if kind.startswith("A") else shape[0] == target[0]
        if not fits:
            raise ValueError(
                f"--adapter {str(path)!r} does not fit this model: its {key} {shape} matches no weight of the "
                "model; pass the adapter trained on this model (-m)."
            )
        layers.add(module)
    return {
        "path": str(path),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": sorted(config.get("target_modules") or []),
        "layers": len(layers),
        "parameters": sum(math.prod(shape) for shape in shapes.values()),
    }
