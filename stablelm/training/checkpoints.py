"""Training checkpoints: `checkpoint-{step}` folders that a run resumes from exactly.

A checkpoint folder is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) that
`from_pretrained` and the reference load as they are (for a LoRA run, a peft adapter folder instead), plus
what resuming needs: `optimizer.pt` (the AdamW state), `rng_state.pt` (the random generators) and
`trainer_state.json` (the step, the losses so far and the settings that fix the data order). Both .pt files hold tensors and numbers only and are read with
`weights_only=True`.

A checkpoint is written in full into a hidden `.checkpoint-{step}.partial` folder, then renamed: an
interrupted write leaves only that partial folder, which is ignored and cleared by the next save, and the
last good checkpoint stays in place. Older checkpoints beyond the number to keep are removed afterwards.

Resuming reads and checks everything first (the state's fields, the weights' shapes against the model, the
optimiser state's shapes against the parameters, the random generators' state) and only then changes the
model, the optimiser and the generators: a damaged or foreign checkpoint is a `CheckpointError` naming the
file, and leaves the run as it was. `check_output_dir` tells before a run starts whether its saves can work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import CheckpointError
from .lora import ADAPTER_WEIGHTS, is_peft_model, read_adapter_state

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel
    from ..tokenizer import Tokenizer

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# trainer_state.json's fields and their types (see trainer.TrainingState).
_STATE_FIELDS = {"step": int, "tokens_seen": int, "log_history": list, "run": dict}
_DAMAGED = (
    "delete that folder to resume from the checkpoint before it, or start afresh in another --output-dir"
)


def check_output_dir(path: str | os.PathLike, *, name: str = "output_dir") -> None:
    """Raise ValueError unless checkpoints can be written to `path`: a folder, or one that can be created.

    Called before training starts, so that a bad folder costs no steps. Creates nothing: a missing folder
    is checked at its nearest existing parent. Writing is tested by creating and removing a temporary file.

    Args:
        path: The output folder.
        name: How messages name it ("--output-dir" on the command line).
    """
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise ValueError(
            f"{name} {str(path)!r}: {existing} is a broken symbolic link; remove it or choose another folder."
        )
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ValueError(
            f"{name} {str(path)!r} {where}; choose a folder (new or existing) for the checkpoints and the model."
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".stablelm-write-test-", dir=existing)
    except OSError as err:
        what = "write there" if existing == path else f"create it: cannot write in {existing}"
        raise ValueError(
            f"{name} {str(path)!r}: cannot {what} ({err.strerror or err}); choose a folder you can write to."
        ) from err
    os.close(handle)
    os.remove(probe)


def save_checkpoint(
    output_dir: Path,
    *,
    model: StableLmPreTrainedModel,
    tokenizer: Tokenizer | None,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `output_dir/checkpoint-{state['step']}` atomically and keep the newest `keep` checkpoints.

    `optimizer_state` is a one-process `optimizer.state_dict()` (see `distributed.full_optimizer_state`).
    """
    step = int(state["step"])
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    _save_tensors(optimizer_state, partial / OPTIMIZER_NAME)
    _save_tensors(_rng_state(), partial / RNG_NAME)
    (partial / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    _fsync(partial / STATE_NAME)
    _commit(partial, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest (lowest step) first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / STATE_NAME).is_file()
    ]
    return [path for _, path in sorted(found)]


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (trainer_state.json) of a checkpoint folder, its fields checked.

    Raises:
        FileNotFoundError: There is no trainer_state.json.
        stablelm.CheckpointError: It is not JSON, or lacks a field, or a field has the wrong type.
    """
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(folder)} is not a training checkpoint (no {STATE_NAME}); resume from a checkpoint-N folder "
            "that a training run wrote."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is damaged: not JSON ({err}); {_DAMAGED}.") from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is damaged: it holds a JSON {type(state).__name__}, not an object; {_DAMAGED}."
        )
    for key, kind in _STATE_FIELDS.items():
        if key not in state:
            raise CheckpointError(
                f"{path} is not a trainer state of this package: it lacks {key!r}; {_DAMAGED}."
            )
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise CheckpointError(
                f"{path} is not a trainer state of this package: {key!r} is {value!r}, not a "
                f"{'count' if kind is int else kind.__name__}; {_DAMAGED}."
            )
    unknown = sorted(set(state) - set(_STATE_FIELDS))
    if unknown:
        raise CheckpointError(
            f"{path} is not a trainer state of this package: unknown fields {unknown}; {_DAMAGED}."
        )
    return state


@dataclass
class SavedTraining:
    """What a checkpoint holds, read and checked: the trainer state, the whole model's weights (a LoRA run's:
    the adapter's, named as peft saves them), the optimiser state (as one process's `state_dict()`) and the random generators' state."""

    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, Any]


def read_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_class: type[StableLmPreTrainedModel] | None = None,
    device: torch.device | str | None = None,
) -> SavedTraining:
    """Read `folder` and check it against `model` and `optimizer` (a sharded model is checked by the whole
    shapes of its parameters), changing nothing.

    Args:
        model_class: The class that reads the weights (default: the model's own).
        device: Where the weights and the optimiser state go (default: the model's device).

    Raises:
        FileNotFoundError: `folder` is not a complete training checkpoint.
        stablelm.CheckpointError: A file is damaged, or its weights or optimiser state do not fit `model`.
    """
    folder = Path(folder)
    device = model.device if device is None else device
    missing = [name for name in (STATE_NAME, OPTIMIZER_NAME, RNG_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete training checkpoint (missing {', '.join(missing)}); resume from a "
            "checkpoint-N folder that a training run wrote."
        )
    state = read_trainer_state(folder)
    if is_peft_model(
        model
    ):  # a LoRA run: the checkpoint holds the adapter, the base model is the one started from
        saved = read_adapter_state(folder, model=model, device=device)
    elif (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} holds a LoRA adapter, not a whole model: resume it with the --lora-r and --lora-target "
            "that run used."
        )
    else:
        reader = model_class or type(model)
        saved = reader.from_pretrained(folder, dtype=model.dtype, device=device).state_dict()
        _check_weights(folder, saved, dict(model.state_dict()))
    optimizer_state = _load_tensors(folder / OPTIMIZER_NAME, map_location=device)
    _check_optimizer_state(folder / OPTIMIZER_NAME, optimizer_state, optimizer)
    rng = _load_tensors(folder / RNG_NAME, map_location="cpu")
    _check_rng_state(folder / RNG_NAME, rng)
    return SavedTraining(state=state, weights=saved, optimizer_state=optimizer_state, rng=rng)


def _load_tensors(path: Path, *, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    # A damaged file fails anywhere in torch.load's unpickler (struct.error, KeyError, RuntimeError, ...).
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).split('. ')[0]}"
        raise CheckpointError(
            f"{path} is damaged or not a file torch.save wrote ({reason}); {_DAMAGED}."
        ) from err


def _check_weights(folder: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless the weights `saved` in `folder` have the names and shapes of `expected`."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"The weights in {folder} are from another model: {(missing or unexpected)[:3]} are "
            f"{'missing' if missing else 'unexpected'}. Resume with the --config or --model that run used."
        )
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise CheckpointError(
                f"The weights in {folder} are from another model: {name} is {tuple(saved[name].shape)} there "
                f"but {tuple(tensor.shape)} here. Resume with the --config or --model that run used."
            )


def _check_optimizer_state(path: Path, state: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise CheckpointError unless `state` is an optimiser state dict whose shapes fit `optimizer`'s parameters."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise CheckpointError(f"{path} is not an optimiser state (no param_groups and state); {_DAMAGED}.")
    ours = [group["params"] for group in optimizer.param_groups]
    theirs = [group.get("params") if isinstance(group, dict) else None for group in groups]
    if [len(p) if isinstance(p, list) else None for p in theirs] != [len(p) for p in ours]:
        raise CheckpointError(
            f"{path} is the optimiser state of another model (its parameter groups hold "
            f"{[len(p) if isinstance(p, list) else None for p in theirs]} parameters, this model's "
            f"{[len(p) for p in ours]}). Resume with the --config or --model that run used."
        )
    for parameters, ids in zip(ours, theirs, strict=True):
        for parameter, index in zip(parameters, ids, strict=True):
            for key, value in (state["state"].get(index) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise CheckpointError(
                        f"{path} is the optimiser state of another model: its {key} of parameter {index} is "
                        f"{tuple(value.shape)}, the parameter {tuple(parameter.shape)}. Resume with the --config "
                        "or --model that run used."
                    )


def _check_rng_state(path: Path, state: Any) -> None:
    cpu = state.get("cpu") if isinstance(state, dict) else None
    if (
        not isinstance(cpu, torch.Tensor)
        or cpu.dtype != torch.uint8
        or cpu.numel() != torch.get_rng_state().numel()
    ):
        raise CheckpointError(f"{path} is not the random generators' state of a training run; {_DAMAGED}.")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Set the random generators to a state `rng_state.pt` held."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensors(data: Any, path: Path) -> None:
    torch.save(data, path)
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _commit(partial: Path, final: Path) -> None:
    """Rename the finished `partial` folder to `final`, replacing an older `final` only once it is whole."""
    if not final.exists():
        os.replace(partial, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
