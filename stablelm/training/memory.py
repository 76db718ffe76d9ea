"""Will a training run fit in memory? An estimate from the config alone, made before anything is allocated.

Training in float32 with AdamW holds, per parameter, the weight, its gradient and AdamW's two moments: 16
bytes. The activations kept for the backward pass add, per token of a micro-batch, the inputs of each
layer's norms, projections and MLP (with gradient checkpointing: each layer's input, plus one layer's
worth) and the logits with their gradient. The estimate of the activations is a low one (attention's
score matrices are left out, as SDPA's fused kernels do not keep them), so a run it refuses clearly cannot
fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import StableLmConfig
from ..heads import StableLmForCausalLM
from .wording import plural, size_text

_FLOAT32 = 4


class InsufficientMemoryError(ValueError, MemoryError):
    """The run needs more memory than the device has available (a ValueError: the settings ask too much)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs, by kind."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def count_parameters(config: StableLmConfig) -> int:
    """The parameters of `StableLmForCausalLM(config)` (a tied head counted once), built without memory."""
    with torch.device("meta"):
        model = StableLmForCausalLM(config)
    return sum(parameter.numel() for parameter in model.parameters())


def estimate_training_memory(
    config: StableLmConfig,
    *,
    batch_size: int,
    block_size: int,
    gradient_checkpointing: bool = False,
    activation_bytes: int = _FLOAT32,
    trainable_parameters: int | None = None,
) -> MemoryEstimate:
    """The memory a float32 AdamW run of `config` needs, with micro-batches of `batch_size` x `block_size`.

    Args:
        activation_bytes: Bytes per activation value: 4 in float32, 2 under bf16 autocast.
        trainable_parameters: The parameters that train, when not all do (a LoRA adapter's): only they have
            gradients and AdamW moments.
    """
    parameters = count_parameters(config)
    weights = parameters * _FLOAT32
    trainable = parameters if trainable_parameters is None else trainable_parameters
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    # Per token and layer: two norms' inputs and outputs (4h), q, k and v (h + 2kv), the attention output
    # (h), the MLP's gate, up and product (3i).
    per_layer = 6 * hidden + 2 * kv + 3 * config.intermediate_size
    kept = layers * hidden + per_layer if gradient_checkpointing else layers * per_layer
    per_token = kept * activation_bytes + 2 * config.vocab_size * _FLOAT32  # logits and their gradient
    return MemoryEstimate(
        parameters=parameters,
        weights=weights,
        gradients=trainable * _FLOAT32,
        optimizer=2 * trainable * _FLOAT32,
        activations=batch_size * block_size * per_token,
    )


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for a run on `device`: the GPU's free memory, or the system's available memory (within
    the cgroup's limit, in a container); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = [value for value in (_meminfo_available(), _cgroup_available(), _sysconf_available()) if value]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        return max(0, int(limit) - int(used)) if limit != "max" else None
    except (OSError, ValueError):
        return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_training_memory(
    estimate: MemoryEstimate, *, device: torch.device | str, weights_loaded: bool = False
) -> None:
    """Raise InsufficientMemoryError if `estimate` clearly exceeds the memory available on `device`.

    Args:
        weights_loaded: The weights are already in memory (a checkpoint to fine-tune), so the available
            memory need only hold the rest.
    """
    available = available_memory(device)
    needed = estimate.total - (estimate.weights if weights_loaded else 0)
    if available is None or needed <= available:
        return
    weights = "" if weights_loaded else f"{size_text(estimate.weights)} of weights, "
    if needed - estimate.activations > available:
        advice = "Make the model smaller (hidden_size, intermediate_size, num_hidden_layers, vocab_size)"
    else:
        advice = (
            "Lower --batch-size or --block-size (raising --grad-accum keeps the effective batch), add "
            "--gradient-checkpointing, or make the model smaller"
        )
    raise InsufficientMemoryError(
        f"Training this model needs about {size_text(needed)} but {torch.device(device).type} has {size_text(available)} "
        f"available: {plural(estimate.parameters, 'parameter')} take {weights}{size_text(estimate.gradients)} of "
        f"gradients and {size_text(estimate.optimizer)} of AdamW moments (float32), and the activations of a "
        f"micro-batch about {size_text(estimate.activations)}. {advice}."
    )
