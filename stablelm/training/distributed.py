"""Data-parallel training on torch.distributed: the process group, DDP or FSDP2, and full state dicts.

A run started by `torchrun` (or `python -m torch.distributed.run`) finds its rank, local rank and world size
in the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain run is
one process and needs none of this. NCCL joins the processes on CUDA devices (one GPU per process, chosen by
the local rank), gloo on the CPU.

Two strategies:
- "ddp": every rank holds the whole model and optimiser; DistributedDataParallel averages the gradients.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the units of the model's `fsdp_plan` (the
  embedding, each decoder layer, the final norm; see `stablelm.training.fsdp_plan`), then the rest of the model,
  over the ranks, so parameters, gradients and AdamW's moments are split W ways; in bf16 the layers gather
  their parameters in bf16 and reduce gradients in float32 (`MixedPrecisionPolicy`).

Checkpoints are whole-model, written once: `full_model` and `full_optimizer_state` gather the shards onto
rank 0's CPU, and the optimiser state is kept in the layout a one-process `optimizer.state_dict()` has
(parameters numbered in the optimiser's order), so a checkpoint is the same whatever the world size that
wrote it, and resumes on any other (`load_full_state`).

When a rank fails, it exits with its error; torchrun sees that exit and stops the other ranks, which would
otherwise wait in their next collective. The process group's timeout (`--dist-timeout`) ends a collective
that waits on a rank that hangs without exiting.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from .fsdp_plan import units as fsdp_units

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and NCCL: long enough for a 12B checkpoint save
_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel run (the defaults: one process, no process group).

    Attributes:
        rank: This process's rank, 0 to world_size - 1.
        local_rank: Its rank on its machine (which GPU it uses).
        world_size: The number of processes.
        strategy: "ddp" or "fsdp".
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r} (--strategy).")
        if not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"rank {self.rank} (local rank {self.local_rank}) does not fit a world of {self.world_size} "
                "processes; start the run with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE."
            )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to agree with."""
        return self.world_size > 1


def from_environment(*, strategy: str = "ddp") -> Distributed:
    """This process's place in the run, from the variables torchrun sets (none: a one-process run).

    Raises:
        ValueError: The variables are only partly set, or are not integers that fit together.
    """
    found = {name: os.environ.get(name) for name in _ENVIRONMENT}
    if all(value is None for value in found.values()):
        return Distributed(strategy=strategy)
    missing = [name for name, value in found.items() if value is None]
    if missing:
        raise ValueError(
            f"The environment sets {', '.join(n for n in _ENVIRONMENT if n not in missing)} but not "
            f"{', '.join(missing)}; start distributed runs with torchrun (or python -m torch.distributed.run)."
        )
    try:
        values = {name: int(value) for name, value in found.items()}
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, got {found}.") from None
    return Distributed(
        rank=values["RANK"],
        local_rank=values["LOCAL_RANK"],
        world_size=values["WORLD_SIZE"],
        strategy=strategy,
    )


def process_device(dist: Distributed, device: torch.device) -> torch.device:
    """The device of this process: on CUDA, the GPU of its local rank; elsewhere `device` itself."""
    if device.type == "cuda" and dist.active:
        if dist.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"Local rank {dist.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per machine (torchrun --nproc-per-node)."
            )
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(
    dist: Distributed, *, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join the other ranks (NCCL on CUDA, gloo elsewhere); nothing for a one-process run."""
    if not dist.active or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_process_group() -> None:
    """Leave the process group after a run that ended normally, once every rank is done with it."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def wrap(model: nn.Module, dist: Distributed, *, bf16: bool) -> nn.Module:
    """The module to run forward and backward through: `model` itself (one process), DDP around it, or
    `model` sharded in place by FSDP2 (the units of its `fsdp_plan`, then the root)."""
    if not dist.active:
        return model
    if not torch.distributed.is_initialized():
        raise ValueError(
            f"This process is rank {dist.rank} of {dist.world_size}, but has not joined the others: call "
            "stablelm.training.distributed.init_process_group first."
        )
    if dist.strategy == "ddp":
        device_ids = [model.device] if model.device.type == "cuda" else None
        # The rotary buffers are computed, the same on every rank: no need to broadcast them each forward
        # (torch 2.13 renamed the flag; older versions know only broadcast_buffers).
        ddp = nn.parallel.DistributedDataParallel
        flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else None
        return ddp(model, device_ids=device_ids, **{flag or "broadcast_buffers": False})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mp_policy": policy} if policy is not None else {}
    # A peft model (LoRA) holds the causal LM inside; its decoder layers are sharded as they are, frozen base
    # weights and trained adapters together (FSDP2 shards each parameter on its own).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _, module, reshard in fsdp_units(base):  # the model's fsdp_plan: embedding, layers, final norm
        fully_shard(module, reshard_after_forward=reshard, **options)
    fully_shard(model, **options)
    # The causal LM returns its logits as a view; nothing changes them in place, which is what FSDP2 warns of.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks in this backward (the last micro-batch of a step) or not (the others)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = enabled
    elif hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)


def all_reduce(value: torch.Tensor, dist: Distributed, *, op: str = "sum") -> torch.Tensor:
    """`value` summed ("sum") or taken at its largest ("max") over the ranks (itself for one process)."""
    if dist.active:
        value = value.clone()
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(value, op=reduce_op)
    return value


def barrier(dist: Distributed) -> None:
    """Wait for every rank."""
    if dist.active:
        torch.distributed.barrier()


def plain_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's clip_grad_norm_ returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- whole-model state -------------------------------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards `model`'s parameters over the ranks."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model(model: nn.Module, *, model_class: type[nn.Module]) -> nn.Module | None:
    """The whole model on rank 0 (None on the others), for saving: `model` itself unless it is sharded, else
    a `model_class` holding the gathered weights on the CPU. Every rank must call it (it gathers)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if not state:  # the other ranks get nothing back
        return None
    with torch.device("meta"):
        whole = model_class(model.config)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    return whole


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimiser's state as one process's `optimizer.state_dict()` would hold it, on rank 0 (None on the
    others when sharded). Every rank must call it (it gathers)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not state:
        return None
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    strict: bool = True,
) -> None:
    """Load whole-model weights and a one-process optimiser state into `model` and `optimizer`, sharding them
    where the model is sharded. Every rank passes the same full state (each reads the checkpoint).

    `strict` False loads the weights given and leaves the others (a LoRA adapter's, onto its base model)."""
    if not is_sharded(model):
        with torch.no_grad():
            model.load_state_dict(weights, strict=strict)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, weights, options=options)
    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[i]: values for i, values in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=options)
    # set_optimizer_state_dict gives tuples back as lists (betas): keep the hyperparameters as saved.
    for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"], strict=True):
        group.update({key: value for key, value in saved.items() if key != "params"})


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's parameters, in its order (the numbering of a one-process state dict)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
