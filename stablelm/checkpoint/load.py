"""from_pretrained: build the model with meta parameters, check the checkpoint against it, then fill it.

Every check (files, headers, names, shapes) runs before any weight is read, so a bad checkpoint fails
fast and a failed load leaves nothing behind; the layer count and shapes are compared with the config
even before the model is built. Each tensor then comes straight from the memory-mapped file (in place on
the CPU when its dtype is already right, else copied once into its dtype and device), is checked for NaN
and infinities, and takes the place of its meta placeholder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import StableLmConfig
from ..fast import set_kernels
from ..kernels import selected_isa
from ..rope import RotaryEmbedding
from .layout import (
    CONFIG_NAME,
    CheckpointError,
    WeightFiles,
    check_not_empty,
    find_weights,
    read_generation_config,
    resolve_folder,
)
from .plan import LoadPlan, check_before_building, plan_load
from .readers import SafetensorsReader, StoredTensor, TorchBinReader, open_reader

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel

M = TypeVar("M", bound="StableLmPreTrainedModel")
Reader = SafetensorsReader | TorchBinReader

_PROGRESS_DELAY_S = 2.0  # a load quicker than this shows no progress bar


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
    dtype = _one_of("dtype", dtype, "torch_dtype", torch_dtype)
    target_device = resolve_device(_one_of("device", device, "device_map", device_map))
    # As the reference (transformers 5): no dtype means "auto", the checkpoint's own.
    fixed_dtype = (
        None if dtype is None or (isinstance(dtype, str) and dtype == "auto") else resolve_dtype(dtype)
    )
    folder = resolve_folder(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    check_not_empty(folder)
    config = _build_config(folder, config, attn_implementation, config_overrides)
    quant, stored_quantized = _quantization(config, quantization_config, folder)
    weights = find_weights(folder)
    readers: list[Reader] = []
    try:
        readers.extend(open_reader(path, weights.format) for path in weights.files)
        found = _tensors_by_name(weights, readers)
        target_dtype = fixed_dtype or _auto_dtype(config, (stored.dtype for _, stored in found.values()))
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
            dense = {k: v for k, v in shapes.items() if not _quantized_key(k, shapes)}
            model, plan = plan_checkpoint(
                cls, config, shapes, source=weights.source, prepare=prepare, dense_found=dense,
                ignore_mismatched_sizes=ignore_mismatched_sizes,
            )  # fmt: skip
            _check_quantized_dtypes(expected, found, plan, quant)
        else:
            model, plan = plan_checkpoint(
                cls, config, shapes, source=weights.source, ignore_mismatched_sizes=ignore_mismatched_sizes
            )
            if quant is not None:
                prepare(model)
                quantized_on_load = {key for key in expected if key.endswith(".weight")}
        state = _materialise(
            plan, found, readers, dtype=target_dtype, device=target_device, quant=quant,
            quantize_keys=quantized_on_load, stored_quantized=stored_quantized,
        )  # fmt: skip
    finally:
        for reader in readers:
            reader.close()
    _keep_stored_heads(model, state, plan, found)
    _install(model, state, plan, dtype=target_dtype, device=target_device)
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


# ---- arguments -------------------------------------------------------------------------------------------
def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
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


def _auto_dtype(config: StableLmConfig, stored: Any) -> torch.dtype:
    """dtype="auto": the config's `torch_dtype`, else the checkpoint's first floating-point dtype."""
    if config.torch_dtype is not None:
        return resolve_dtype(config.torch_dtype, what=f"torch_dtype in {CONFIG_NAME}")
    return next((d for d in stored if d.is_floating_point), torch.float32)


def _build_config(
    folder: Path, config: StableLmConfig | None, attn_implementation: str | None, overrides: dict[str, Any]
) -> StableLmConfig:
    if config is None:
        config = StableLmConfig.from_pretrained(folder)
    elif not isinstance(config, StableLmConfig):
        raise TypeError(f"config must be a StableLmConfig, got {type(config).__name__}.")
    attn_implementation = attn_implementation or config.attn_implementation
    if overrides:
        known = set(StableLmConfig().to_dict()) | {"num_labels", "id2label", "label2id"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"from_pretrained() got unexpected keyword arguments {unknown}; besides the loading options, "
                "keyword arguments must be config fields (such as num_labels or pad_token_id)."
            )
        config = StableLmConfig.from_dict(config.to_dict(), **overrides)
    else:
        config = copy.deepcopy(config)  # the model owns its config; the caller's stays as it was
    config.attn_implementation = attn_implementation
    config.validate()
    return config


# ---- quantization ----------------------------------------------------------------------------------------
def _quantization(config: StableLmConfig, requested: Any, folder: Path) -> tuple[Any, bool]:
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


_QUANT_SUFFIXES = (".weight_scale", ".weight_min")


def _quantized_key(key: str, shapes: dict) -> bool:
    if key.endswith(_QUANT_SUFFIXES):
        return True
    return key.endswith(".weight") and key[: -len("weight")] + "weight_scale" in shapes


def _check_quantized_dtypes(expected: dict, found: dict, plan: LoadPlan, quant: Any) -> None:
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
        with _EmptyParameters():
            return DecoderLayer(config, 0)

    check_before_building(
        config, found if dense_found is None else dense_found, source=source, one_layer=one_layer
    )
    with _EmptyParameters():
        model = cls(config)
    if prepare is not None:  # a stored quantized checkpoint: its layers become quantized placeholders first
        prepare(model)
    return model, plan_load(model, found, source=source, ignore_mismatched_sizes=ignore_mismatched_sizes)


# ---- filling the model -----------------------------------------------------------------------------------
def _materialise(
    plan: LoadPlan,
    found: dict[str, tuple[Reader, StoredTensor]],
    readers: list[Reader],
    *,
    dtype: torch.dtype,
    device: torch.device,
    quant: Any = None,
    quantize_keys: set[str] | frozenset[str] = frozenset(),
    stored_quantized: bool = False,
) -> dict[str, torch.Tensor]:
    """Read every planned tensor once, shard by shard in file order, into `dtype` on `device`.

    `quantize_keys` (model keys of dense weights): each is copied out of the file (its pages given
    back), quantized and dropped before the next is read. A stored quantized checkpoint's scales keep
    their stored dtype."""
    model_key = {ckpt: key for key, ckpt in {**plan.sources, **plan.stored_aliases}.items()}
    total = sum(found[ckpt][1].nbytes for ckpt in model_key)
    state: dict[str, torch.Tensor] = {}
    with _progress_bar(total, f"Loading {len(readers)} shard{'s' if len(readers) > 1 else ''}") as bar:
        for reader in readers:
            names = [ckpt for ckpt in reader.tensors if ckpt in model_key]
            plain = [
                n
                for n in names
                if model_key[n] not in quantize_keys
                and not (stored_quantized and n.endswith(_QUANT_SUFFIXES))
            ]
            kept = [n for n in names if stored_quantized and n.endswith(_QUANT_SUFFIXES)]
            for ckpt, tensor in reader.materialise(plain, dtype=dtype, device=device):
                state[model_key[ckpt]] = tensor
                bar.update(found[ckpt][1].nbytes)
            for ckpt in kept:  # scales as stored (float32 / bfloat16), whatever the model's dtype
                for _, tensor in reader.materialise([ckpt], dtype=found[ckpt][1].dtype, device=device):
                    state[model_key[ckpt]] = tensor
                bar.update(found[ckpt][1].nbytes)
            for ckpt in sorted(
                (n for n in names if model_key[n] in quantize_keys), key=lambda n: reader.tensors[n].offset
            ):
                stored_dtype = found[ckpt][1].dtype
                for _, dense in reader.materialise(
                    [ckpt], dtype=stored_dtype, device=torch.device("cpu"), copy=True
                ):
                    state.update(_quantize_tensor(model_key[ckpt], dense, quant, device))
                    del dense
                bar.update(found[ckpt][1].nbytes)
    return state


def _quantize_tensor(
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


def _keep_stored_heads(
    model: StableLmPreTrainedModel,
    state: dict[str, torch.Tensor],
    plan: LoadPlan,
    found: dict[str, tuple[Reader, StoredTensor]],
) -> None:
    """A head the checkpoint stores although the config ties it: tied if it equals the embedding, else
    kept as stored (untied, `tie_word_embeddings` turned off) with a warning, never silently dropped."""
    for alias, ckpt in plan.stored_aliases.items():
        key = plan.aliases[alias]
        if torch.equal(state[alias], state[key]):
            state[alias] = state[key]
            continue
        model.config.tie_word_embeddings = False
        warnings.warn(
            f"{found[ckpt][0].path} stores its own {ckpt}, which differs from {key}, but the config sets "
            "tie_word_embeddings to true (the head would share the embedding). Loading the stored head "
            "untied, as the reference does; model.config.tie_word_embeddings is now False. If the head should "
            f'be the embedding, remove {ckpt} from the file; otherwise set "tie_word_embeddings": false in '
            f"{CONFIG_NAME}.",
            UserWarning,
            stacklevel=4,
        )


def _install(
    model: StableLmPreTrainedModel,
    state: dict[str, torch.Tensor],
    plan: LoadPlan,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Swap the meta placeholders for the loaded tensors; initialise a new head; tie; compute the rotary tables."""
    for key in plan.new:
        state[key] = torch.empty(plan.shapes[key], dtype=dtype, device=device)
    for alias, key in plan.aliases.items():
        state.setdefault(alias, state[key])
    model.load_state_dict(state, strict=True, assign=True)
    for owner in dict.fromkeys(model.get_submodule(key.rpartition(".")[0]) for key in plan.new):
        model._init_weights(owner)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # its buffers are computed: allocate them, then compute
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
            module.reset_buffers(device)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.device != device]
    if left:  # a tensor this loader does not know how to fill: fail here, not in the first forward
        raise RuntimeError(f"Internal error: {left} not on {device} after loading; teach load.py about it.")


class _EmptyParameters(TorchFunctionMode):
    """Build a model with its parameters on the meta device (no memory) and no random initialisation.

    Not `torch.device("meta")`: that runs every op on meta, and the meta kernels of some (`normal_`,
    `div`) import torch._dynamo on first use, a second per process. Here only `torch.empty` (how every
    nn.Module allocates its parameters) goes to meta, initialising a meta tensor is skipped, and the small
    computed buffers (rotary frequencies) are computed as usual.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            return func(*args, **{**kwargs, "device": "meta"})
        if func in (nn.init.normal_, torch.Tensor.normal_):
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _warn_new_and_unused(model: nn.Module, plan: LoadPlan, source: Path) -> None:
    parts = []
    if plan.new:
        parts.append(
            f"newly initialised, not in {source}: {', '.join(plan.new)} (train the model on its task before "
            "trusting its predictions)"
        )
    if plan.unused:
        parts.append(f"not used, the weights of another task's head: {', '.join(plan.unused)}")
    if parts:
        warnings.warn(
            f"{type(model).__name__}.from_pretrained: {'; '.join(parts)}.", UserWarning, stacklevel=4
        )


class _Silent:
    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int, desc: str) -> contextlib.AbstractContextManager:
    """A tqdm bar over the bytes read, shown only on a terminal and only once loading takes a while."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (huggingface_hub brings it)
        return contextlib.nullcontext(_Silent())
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=_PROGRESS_DELAY_S,
        disable=not sys.stderr.isatty(),
        leave=False,
        file=sys.stderr,
    )
