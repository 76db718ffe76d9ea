"""Training checkpoints: `checkpoint-{step}` folders that a run resumes from exactly.

A checkpoint folder is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) that
`from_pretrained` and the reference load as they are, plus what resuming needs: `optimizer.pt` (the AdamW
state), `rng_state.pt` (the random generators) and `trainer_state.json` (the step, the losses so far and the
settings that fix the data order). Both .pt files hold tensors and numbers only and are read with
`weights_only=True`.

A checkpoint is written in full into a hidden `.checkpoint-{step}.partial` folder, then renamed: an
interrupted write leaves only that partial folder, which is ignored and cleared by the next save, and the
last good checkpoint stays in place. Older checkpoints beyond the number to keep are removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel
    from ..tokenizer import Tokenizer

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(
    output_dir: Path,
    *,
    model: StableLmPreTrainedModel,
    tokenizer: Tokenizer | None,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `output_dir/checkpoint-{state['step']}` atomically and keep the newest `keep` checkpoints."""
    step = int(state["step"])
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    _save_tensors(optimizer.state_dict(), partial / OPTIMIZER_NAME)
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


def load_checkpoint(
    folder: Path, *, model: StableLmPreTrainedModel, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the weights, the optimiser and the random generators from `folder`; return its trainer state.

    Raises:
        FileNotFoundError: `folder` is not a complete training checkpoint.
        stablelm.checkpoint.CheckpointError: Its weights do not fit `model`.
    """
    missing = [name for name in (STATE_NAME, OPTIMIZER_NAME, RNG_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete training checkpoint (missing {', '.join(missing)}); resume from a "
            "checkpoint-N folder that a training run wrote."
        )
    saved = type(model).from_pretrained(folder, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        model.load_state_dict(saved.state_dict())
    del saved
    optimizer.load_state_dict(
        torch.load(folder / OPTIMIZER_NAME, map_location=model.device, weights_only=True)
    )
    _set_rng_state(torch.load(folder / RNG_NAME, weights_only=True))
    return json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
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
