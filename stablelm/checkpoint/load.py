"""from_pretrained: build the model with meta parameters, check the checkpoint against it, then fill it.

Every check (files, headers, names, shapes) runs before any weight is read, so a bad checkpoint fails
fast and a failed load leaves nothing behind; the layer count and shapes are compared with the config
even before the model is built. Each tensor then comes straight from the memory-mapped file (in place on
the CPU when its dtype is already right, else copied once into its dtype and device), is checked for NaN
and infinities, and takes the place of its meta placeholder.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from ..config import StableLmConfig
from ..fast import set_kernels
from ..kernels import selected_isa
from ..layers import optimize_by_default
from . import huge_pages
from .fill import EmptyParameters, Reader, install, keep_stored_heads, materialise
from .layout import (
    CONFIG_NAME,
    CheckpointError,
    WeightChoice,
    WeightFiles,
    check_not_empty,
    find_weights,
    read_generation_config,
    resolve_folder,
)
from .options import auto_dtype, build_config, one_of, resolve_device, resolve_dtype
from .plan import LoadPlan, check_before_building, names, plan_load
from .quantized import check_quantized_dtypes, is_quantized_key, quantization_for
from .readers import StoredTensor, open_reader

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel

M = TypeVar("M", bound="StableLmPreTrainedModel")


def load_pretrained(
    cls: type[M],
    name_or_path: str | os.PathLike,
    *,
    config: StableLmConfig | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    device_map: torch.device | str | int | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str = "",
    variant: str | None = None,
    use_safetensors: bool | None = None,
    trust_remote_code: bool | None = None,
    optimize: bool | None = None,
    quantization_config: Any = None,
    ignore_mismatched_sizes: bool = False,
    loading_info: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> M:
    """Load `cls` from a checkpoint folder or hub repo id; see `StableLmPreTrainedModel.from_pretrained`.

    A `loading_info` dict receives the reference's loading report: `missing_keys` (initialised afresh),
    `unexpected_keys` (left unread), `mismatched_keys` (key, checkpoint shape, model shape) and `error_msgs`.
    """
    del trust_remote_code  # accepted for the reference's snippets: nothing from a checkpoint is ever executed
    if optimize is not None and not isinstance(optimize, bool):
        raise TypeError(f"optimize must be True, False or None, got {optimize!r}.")
    selected_isa()  # a bad STABLELM_ISA is an error here, before anything is read
    huge_pages.requested()  # ... and a bad STABLELM_HUGE_PAGES
    dtype = one_of("dtype", dtype, "torch_dtype", torch_dtype)
    target_device = resolve_device(one_of("device", device, "device_map", device_map))
    # As the reference (transformers 5): no dtype means "auto", the checkpoint's own.
    fixed_dtype = (
        None if dtype is None or (isinstance(dtype, str) and dtype == "auto") else resolve_dtype(dtype)
    )
    choice = WeightChoice(variant=variant, use_safetensors=use_safetensors)
    folder = resolve_folder(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        force_download=force_download, subfolder=subfolder, choice=choice,
    )  # fmt: skip
    check_not_empty(folder)
    config = build_config(folder, config, attn_implementation, config_overrides)
    quant, stored_quantized = quantization_for(config, quantization_config, folder)
    quant = copy.deepcopy(quant)  # the layers kept dense are added to it, not to the caller's
    weights = find_weights(folder, choice)
    readers: list[Reader] = []
    try:
        readers.extend(open_reader(path, weights.format) for path in weights.files)
        found = _tensors_by_name(weights, readers)
        target_dtype = fixed_dtype or auto_dtype(config, (stored.dtype for _, stored in found.values()))
        shapes = {name: stored.shape for name, (_, stored) in found.items()}
        quantized_on_load: set[str] = set()
        expected: dict = {}

        def prepare(model: nn.Module) -> None:
            from ..quantization.apply import expected_tensors, replace_with_empty

            if config.tie_word_embeddings:  # a head that shares the embedding stays as it is
                quant.modules_to_not_convert = list(dict.fromkeys([*quant.modules_to_not_convert, "lm_head"]))
            expected.update(expected_tensors(model, quant))
            replace_with_empty(model, quant, target_dtype)

        if stored_quantized:  # the dense layers' shapes are checked against the config from the others
            dense = {k: v for k, v in shapes.items() if not is_quantized_key(k, shapes)}
            model, plan = plan_checkpoint(
                cls, config, shapes, source=weights.source, prepare=prepare, dense_found=dense,
                ignore_mismatched_sizes=ignore_mismatched_sizes,
            )  # fmt: skip
            check_quantized_dtypes(expected, found, plan, quant)
            _refuse_new_quantized(plan, expected, weights.source)
        else:
            model, plan = plan_checkpoint(
                cls, config, shapes, source=weights.source, ignore_mismatched_sizes=ignore_mismatched_sizes
            )
            if quant is not None:
                # Layers the checkpoint lacks stay dense: they are initialised, not read and quantized.
                fresh = dict.fromkeys(key.rpartition(".")[0] for key in plan.new)
                quant.modules_to_not_convert = list(dict.fromkeys([*quant.modules_to_not_convert, *fresh]))
                prepare(model)
                quantized_on_load = {key for key in expected if key.endswith(".weight")}
        kernels = optimize if optimize is not None else optimize_by_default()
        state = materialise(
            plan, found, readers, dtype=target_dtype, device=target_device, quant=quant,
            quantize_keys=quantized_on_load, stored_quantized=stored_quantized,
            huge_pages=target_device.type == "cpu" and huge_pages.wanted(kernels),
        )  # fmt: skip
    finally:
        for reader in readers:
            reader.close()
    keep_stored_heads(model, state, plan, found)
    install(model, state, plan, dtype=target_dtype, device=target_device)
    if optimize is not None:
        set_kernels(model, optimize)
        if quant is not None:
            for module in model.modules():
                if hasattr(module, "quant_type"):
                    module.use_kernels = optimize
    model.config.torch_dtype = str(target_dtype).removeprefix("torch.")
    model.generation_config = read_generation_config(folder)
    _warn_new_and_unused(model, plan, weights.source)
    if loading_info is not None:
        loading_info.update(
            missing_keys=set(plan.new) - {key for key, _, _ in plan.mismatched},
            unexpected_keys=set(plan.unused),
            mismatched_keys={(key, tuple(found), tuple(wanted)) for key, wanted, found in plan.mismatched},
            error_msgs=[],
        )
    return model.eval()


# ---- reading ---------------------------------------------------------------------------------------------
def _tensors_by_name(weights: WeightFiles, readers: list[Reader]) -> dict[str, tuple[Reader, StoredTensor]]:
    found: dict[str, tuple[Reader, StoredTensor]] = {}
    for reader in readers:
        for name, stored in reader.tensors.items():
            if name in found:
                raise CheckpointError(
                    f"{name!r} is in both {found[name][0].path} and {reader.path}; shards must not overlap. "
                    "The checkpoint is damaged."
                )
            found[name] = (reader, stored)
    for name, shard in (weights.weight_map or {}).items():
        if name not in found or found[name][0].path != shard:
            raise CheckpointError(
                f"{weights.index} places {name!r} in {shard.name}, but that shard does not hold it: the index and "
                "the shards do not belong together. Download the checkpoint again."
            )
    return found


def plan_checkpoint(
    cls: type[M],
    config: StableLmConfig,
    found: dict[str, tuple[int, ...]],
    *,
    source: Path,
    prepare: Any = None,
    dense_found: dict[str, tuple[int, ...]] | None = None,
    ignore_mismatched_sizes: bool = False,
) -> tuple[M, LoadPlan]:
    """`cls` built with meta parameters, and how the checkpoint's tensors (name -> shape) fill it.

    The layer count and shapes are compared with the config first, from one layer, so that a config that
    does not fit (a million layers, say) is refused at once instead of after building it.
    """
    from ..model import DecoderLayer

    def one_layer() -> nn.Module:
        with EmptyParameters():
            return DecoderLayer(config, 0)

    check_before_building(
        config, found if dense_found is None else dense_found, source=source, one_layer=one_layer
    )
    with EmptyParameters():
        model = cls(config)
    if prepare is not None:  # a stored quantized checkpoint: its layers become quantized placeholders first
        prepare(model)
    return model, plan_load(model, found, source=source, ignore_mismatched_sizes=ignore_mismatched_sizes)


def _refuse_new_quantized(plan: LoadPlan, quantized: set[str] | dict, source: Path) -> None:
    """A stored quantized layer's weights cannot be initialised afresh (initialisation is of dense ones)."""
    lacking = [key for key in plan.new if key in quantized]
    if lacking:
        raise CheckpointError(
            f"{source} lacks {names(lacking)}, which its quantization_config describes as quantized: stablelm "
            "initialises missing weights only in dense layers. Complete the checkpoint, or save it again from "
            "the model it was quantized from."
        )


def _warn_new_and_unused(model: nn.Module, plan: LoadPlan, source: Path) -> None:
    """One warning naming what the checkpoint lacks (initialised afresh) and what the model left unread, as
    the reference warns; `output_loading_info=True` lists them all."""
    parts = []
    if plan.new:
        parts.append(
            f"newly initialised, not in {source}: {names(plan.new)} (train the model on its task before "
            "trusting its predictions; a checkpoint that should hold them is incomplete, or of another model)"
        )
        head = model.get_output_embeddings()
        head_keys = [key for key in plan.new if head is not None and key.startswith(_prefix_of(model, head))]
        if head_keys and not model.config.tie_word_embeddings:
            parts.append(
                f"the config sets tie_word_embeddings to false: if the LM head shares the input embedding, set "
                f'"tie_word_embeddings": true in {CONFIG_NAME}'
            )
    if plan.unused:
        parts.append(f"not used, no part of {type(model).__name__}: {names(plan.unused)}")
    if parts:
        warnings.warn(
            f"{type(model).__name__}.from_pretrained: {'; '.join(parts)}.", UserWarning, stacklevel=4
        )


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, found in model.named_modules() if found is module) + "."
