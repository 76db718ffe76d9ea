"""Matching a checkpoint's tensor names and shapes to a model's, before any data is read.

The reference's rules: the backbone prefix (`model.`) is added or removed when a bare StableLmModel
checkpoint meets a model with a head or the other way round; a tensor the checkpoint lacks is initialised
afresh (a classifier's head, the LM head over a bare backbone's checkpoint, ...) and a tensor the model has
no place for is left unused, both reported (`from_pretrained` warns and `output_loading_info` lists them);
a tied LM head needs no tensor of its own; computed rotary frequencies in old checkpoints are ignored. A
tensor of the wrong shape is an error (unless `ignore_mismatched_sizes`). A checkpoint that stores its own
LM head although the config ties it keeps that head (see `LoadPlan`).

Before the model is even built, `check_before_building` compares the checkpoint's layer count and the
shapes of its embedding and of every layer with what the config describes: building a model of a
config that asks for a million layers would take hours, on the meta device too. (A checkpoint with no
decoder layers at all holds nothing to compare: every tensor of the model is then initialised afresh, as
the reference does.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .layout import CONFIG_NAME, CheckpointError

if TYPE_CHECKING:
    from ..config import StableLmConfig

# Rotary frequencies are computed, not loaded; older checkpoints saved them (once per layer, even).
_NON_PERSISTENT = re.compile(r"(^|\.)rotary_emb\.\w*inv_freq$")
_NAMES_SHOWN = 5
# A decoder layer's tensor in a checkpoint of the backbone (`layers.3.mlp...`) or of a model with a head.
_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")
_CONFIG_HINT = (
    f"Check that the config ({CONFIG_NAME} beside the weights, or the config passed) belongs to these "
    "weights: vocab_size, hidden_size, num_hidden_layers, num_key_value_heads, use_qkv_bias, ..."
)


@dataclass(frozen=True)
class LoadPlan:
    """How a checkpoint's tensors fill a model, worked out before any data is read.

    Attributes:
        sources: Model key -> checkpoint key, for every tensor to read.
        shapes: Model key -> shape, for every tensor of the model except tied aliases.
        aliases: Tied model key -> the key whose tensor it shares (`lm_head.weight` -> the embedding).
        new: Model keys the checkpoint lacks, initialised afresh (the head of another task, say).
        unused: Checkpoint keys the model has no place for (another task's head, say), left unread.
        stored_aliases: Tied model key -> checkpoint key, for a tied tensor the checkpoint stores anyway
            (`lm_head.weight` with `tie_word_embeddings`): read too, and kept tied only if it equals the
            tensor it would share; otherwise the model keeps it untied, as the reference does.
    """

    sources: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    new: list[str]
    unused: list[str]
    stored_aliases: dict[str, str] = field(default_factory=dict)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def plan_load(
    model: nn.Module,
    found: dict[str, tuple[int, ...]],
    *,
    source: Path,
    ignore_mismatched_sizes: bool = False,
) -> LoadPlan:
    """Match checkpoint names and shapes to the model's; raise one CheckpointError naming every tensor whose
    shape differs. Tensors the checkpoint lacks are to be initialised afresh, those the model has no place
    for are left unused, as the reference does.

    With `ignore_mismatched_sizes` (the reference's option), a tensor whose shape differs from the model's
    is left unread and its module initialised afresh (a classifier loaded for another number of labels)."""
    shapes, aliases = _expected(model)
    by_model_key = _map_prefix(model, [key for key in found if not _NON_PERSISTENT.search(key)])
    sources = {key: ckpt for key, ckpt in by_model_key.items() if key in shapes}
    stored_aliases = {key: ckpt for key, ckpt in by_model_key.items() if key in aliases}
    new = [key for key in shapes if key not in sources]
    unused = [ckpt for key, ckpt in by_model_key.items() if key not in shapes and key not in aliases]
    mismatched = [
        (key, shapes[key], found[ckpt]) for key, ckpt in sources.items() if shapes[key] != found[ckpt]
    ]
    mismatched += [
        (key, shapes[aliases[key]], found[ckpt])
        for key, ckpt in stored_aliases.items()
        if shapes[aliases[key]] != found[ckpt]
    ]
    ignored = []
    if ignore_mismatched_sizes:
        ignored = [m for m in mismatched if m[0] in sources]
        for key, _, _ in ignored:
            del sources[key]
            new.append(key)
        mismatched = [m for m in mismatched if m not in ignored]
    if mismatched:
        raise _mismatch_error(model, source, mismatched)
    return LoadPlan(sources, shapes, aliases, new, unused, stored_aliases, ignored)


def check_before_building(
    config: StableLmConfig,
    found: dict[str, tuple[int, ...]],
    *,
    source: Path,
    one_layer: Callable[[], nn.Module],
) -> None:
    """Refuse a checkpoint whose layer count, embedding or layer shapes differ from the config's, from the
    names and shapes alone; `one_layer` builds a single decoder layer (on the meta device) to compare with."""
    layers: dict[int, list[tuple[str, str]]] = {}
    for key in found:
        match = _LAYER_KEY.match(key)
        if match and not _NON_PERSISTENT.search(key):
            layers.setdefault(int(match.group(1)), []).append((key, match.group(2)))
    # Fewer layers in the config than in the file build quickly, and `plan_load` names the extra tensors.
    if layers and len(layers) < config.num_hidden_layers:
        numbers = sorted(layers)
        held = ", ".join(map(str, numbers[:_NAMES_SHOWN])) + (" ..." if len(numbers) > _NAMES_SHOWN else "")
        raise CheckpointError(
            f"The config sets num_hidden_layers to {config.num_hidden_layers}, but the weights in {source} hold "
            f"{len(layers)} decoder layers{f' (numbered {held})' if layers else ''}. {_CONFIG_HINT}"
        )
    mismatched = []
    want = (config.vocab_size, config.hidden_size)
    for key in _EMBEDDING_KEYS:
        if key in found and found[key] != want:
            mismatched.append((key, want, found[key]))
    if not mismatched:  # the layer is built at the config's width only once that width is the file's
        expected = {name: tuple(t.shape) for name, t in one_layer().state_dict().items()}
        for keys in layers.values():
            for key, name in keys:
                if name in expected and expected[name] != found[key]:
                    mismatched.append((key, expected[name], found[key]))
    if mismatched:
        lines = [f"The weights in {source} do not fit the model its config describes:"]
        for key, shape, got in mismatched[:_NAMES_SHOWN]:
            lines.append(f"- {key}: the model expects shape {list(shape)}, the checkpoint holds {list(got)}")
        if len(mismatched) > _NAMES_SHOWN:
            lines.append(f"- and {len(mismatched) - _NAMES_SHOWN} more shape mismatches")
        raise CheckpointError("\n".join([*lines, _CONFIG_HINT]))


def _expected(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
            shapes[name] = tuple(tensor.shape)
    return shapes, aliases


def _map_prefix(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model key -> checkpoint key, adding or removing the backbone prefix (`model.`) as the reference does."""
    prefix = model.base_model_prefix + "."
    has_backbone = isinstance(getattr(model, model.base_model_prefix, None), nn.Module)
    prefixed = any(key.startswith(prefix) for key in keys)
    if has_backbone and not prefixed:  # a bare StableLmModel checkpoint into a model with a head
        return {prefix + key: key for key in keys}
    if not has_backbone and prefixed:  # a checkpoint with a head into the bare StableLmModel
        return {key.removeprefix(prefix): key for key in keys}
    return {key: key for key in keys}


def _mismatch_error(
    model: nn.Module, source: Path, mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> CheckpointError:
    lines = [f"The weights in {source} do not fit {type(model).__name__} as its config describes it:"]
    for key, want, got in mismatched[:_NAMES_SHOWN]:
        lines.append(f"- {key}: the model expects shape {list(want)}, the checkpoint holds {list(got)}")
    if len(mismatched) > _NAMES_SHOWN:
        lines.append(f"- and {len(mismatched) - _NAMES_SHOWN} more shape mismatches")
    lines.append(_CONFIG_HINT + " (or pass ignore_mismatched_sizes=True to initialise them afresh)")
    return CheckpointError("\n".join(lines))


def names(keys: list[str]) -> str:
    """The first few of `keys`, and how many more, for a message."""
    shown = ", ".join(keys[:_NAMES_SHOWN])
    return shown + (f" and {len(keys) - _NAMES_SHOWN} more" if len(keys) > _NAMES_SHOWN else "")
