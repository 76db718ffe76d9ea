"""Filling a model planned from a checkpoint: read each tensor once into its dtype and device (quantizing
where asked), swap the meta placeholders for them, initialise what the checkpoint lacks, tie, and compute
the rotary tables. Also the meta-parameter mode the model is built under before the checkpoint is read."""

from __future__ import annotations

import contextlib
import sys
import warnings
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..rope import RotaryEmbedding
from .layout import CONFIG_NAME
from .plan import LoadPlan
from .quantized import QUANT_SUFFIXES, quantize_tensor
from .readers import SafetensorsReader, StoredTensor, TorchBinReader

if TYPE_CHECKING:
    from ..model import StableLmPreTrainedModel

Reader = SafetensorsReader | TorchBinReader

_PROGRESS_DELAY_S = 2.0  # a load quicker than this shows no progress bar


def materialise(
    plan: LoadPlan,
    found: dict[str, tuple[Reader, StoredTensor]],
    readers: list[Reader],
    *,
    dtype: torch.dtype,
    device: torch.device,
    quant: Any = None,
    quantize_keys: set[str] | frozenset[str] = frozenset(),
    stored_quantized: bool = False,
    huge_pages: bool = False,
) -> dict[str, torch.Tensor]:
    """Read every planned tensor once, shard by shard in file order, into `dtype` on `device`.

    `quantize_keys` (model keys of dense weights): each is copied out of the file (its pages given
    back), quantized and dropped before the next is read. A stored quantized checkpoint's scales keep
    their stored dtype. `huge_pages`: CPU tensors used as stored go into huge pages (see `huge_pages`)."""
    model_key = {ckpt: key for key, ckpt in {**plan.sources, **plan.stored_aliases}.items()}
    total = sum(found[ckpt][1].nbytes for ckpt in model_key)
    state: dict[str, torch.Tensor] = {}
    with _progress_bar(total, f"Loading {len(readers)} shard{'s' if len(readers) > 1 else ''}") as bar:
        for reader in readers:
            names = [ckpt for ckpt in reader.tensors if ckpt in model_key]
            plain = [
                n
                for n in names
                if model_key[n] not in quantize_keys and not (stored_quantized and n.endswith(QUANT_SUFFIXES))
            ]
            kept = [n for n in names if stored_quantized and n.endswith(QUANT_SUFFIXES)]
            for ckpt, tensor in reader.materialise(plain, dtype=dtype, device=device, huge_pages=huge_pages):
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
                    state.update(quantize_tensor(model_key[ckpt], dense, quant, device))
                    del dense
                bar.update(found[ckpt][1].nbytes)
    return state


def keep_stored_heads(
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


def install(
    model: StableLmPreTrainedModel,
    state: dict[str, torch.Tensor],
    plan: LoadPlan,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Swap the meta placeholders for the loaded tensors; initialise what the checkpoint lacks; tie; compute
    the rotary tables."""
    for key in plan.new:
        state[key] = torch.empty(plan.shapes[key], dtype=dtype, device=device)
    for alias, key in plan.aliases.items():
        state.setdefault(alias, state[key])
    model.load_state_dict(state, strict=True, assign=True)
    _initialise(model, plan.new)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # its buffers are computed: allocate them, then compute
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
            module.reset_buffers(device)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.device != device]
    if left:  # a tensor this loader does not know how to fill: fail here, not in the first forward
        raise RuntimeError(f"Internal error: {left} not on {device} after loading; teach load.py about it.")


def _initialise(model: StableLmPreTrainedModel, new: list[str]) -> None:
    """Initialise the tensors named in `new` as the model initialises its modules, leaving the loaded
    tensors of the same modules as they are (a layer may lack its bias but not its weight)."""
    by_owner: dict[str, set[str]] = {}
    for key in new:
        owner, _, name = key.rpartition(".")
        by_owner.setdefault(owner, set()).add(name)
    for owner_name, fresh in by_owner.items():
        owner = model.get_submodule(owner_name)
        loaded = {n: p for n, p in owner.named_parameters(recurse=False) if n not in fresh}
        for name, param in loaded.items():  # initialise a stand-in, never the loaded (maybe mapped) data
            setattr(owner, name, nn.Parameter(torch.empty_like(param), requires_grad=param.requires_grad))
        model._init_weights(owner)
        for name, param in loaded.items():
            setattr(owner, name, param)


class EmptyParameters(TorchFunctionMode):
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
