"""Describe a checkpoint: its architecture, parameter count, and size on disk and in memory.

Reads config.json, the weight files' headers and the tokenizer files; no weights are loaded. A config
that does not fit the weights' names and shapes is an error, as it is for loading.

With --json, stdout gets one JSON object with the same facts (config.json's names where it has one,
sizes in bytes). torch and the checkpoint readers are imported by `run`, so that --help stays quick.

examples:
  stablelm info -m stabilityai/stablelm-2-1_6b
  stablelm info -m ./my-model --dtype float16
  stablelm info --json | jq .parameters
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .loading import model_source
from .options import DTYPES, add_adapter_option, add_json_option, add_model_option, add_quantize_option

if TYPE_CHECKING:
    import torch

    from ..checkpoint.layout import WeightFiles
    from ..checkpoint.readers import StoredTensor
    from ..config import StableLmConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the dtype to size the weights in memory for (default: auto, the checkpoint's)",
    )
    add_quantize_option(parser)
    add_adapter_option(parser)
    add_json_option(parser, "print one JSON object with the same facts instead of the table")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint.layout import find_weights, resolve_folder
    from ..checkpoint.load import plan_checkpoint
    from ..checkpoint.options import resolve_dtype
    from ..config import StableLmConfig
    from ..model import StableLmModel

    source = model_source(args.model)
    folder = resolve_folder(source, revision=None, cache_dir=None, local_files_only=False, token=None)
    config = StableLmConfig.from_pretrained(folder)
    weights = find_weights(folder)
    tensors = stored_tensors(weights)
    # The backbone against the config (any task's head fits): refuses a config the weights do not fit.
    shapes = {k: t.shape for k, t in tensors.items()}
    quant = _quantization(config, getattr(args, "quantize", None), folder)
    if config.extra.get("quantization_config"):
        from ..checkpoint.quantized import is_quantized_key
        from ..quantization.apply import replace_with_empty

        dense = {k: v for k, v in shapes.items() if not is_quantized_key(k, shapes)}
        plan_checkpoint(
            StableLmModel, config, shapes, source=weights.source, dense_found=dense,
            prepare=lambda model: replace_with_empty(model, quant, torch.bfloat16),
        )  # fmt: skip
    else:
        plan_checkpoint(StableLmModel, config, shapes, source=weights.source)
    stored = list(dict.fromkeys(t.dtype for t in tensors.values()))
    if args.dtype != "auto":
        dtype = resolve_dtype(args.dtype)
    elif config.torch_dtype is not None:
        dtype = resolve_dtype(config.torch_dtype)
    else:
        dtype = next((d for d in stored if d.is_floating_point), torch.float32)
    quantization = (
        None if quant is None else {**quant.to_dict(), "bytes": quantized_size(config, quant, dtype)}
    )
    adapter = None
    if getattr(args, "adapter", None) is not None:
        from ..training.lora import describe_adapter

        adapter = describe_adapter(args.adapter, weight_shapes=shapes)
    if args.json:
        data = facts(source, config, weights, stored, dtype, folder)
        data["quantization"] = quantization
        data["adapter"] = adapter
        print(json.dumps(data, ensure_ascii=False))
        return 0
    rows = [("model", source), *architecture(config)]
    rows += sizes(config, weights, stored, dtype)
    if quantization is not None:
        group = f", groups of {quant.group_size}" if quant.quant_type == "int4" else ""
        rows.append(
            (
                "quantization",
                f"{quant.quant_type} weight-only{group}: {human_bytes(quantization['bytes'])} in memory",
            )
        )
    if adapter is not None:
        rows.append(
            (
                "adapter",
                f"LoRA r {adapter['r']}, alpha {adapter['lora_alpha']:g} on {','.join(adapter['target_modules'])} "
                f"({adapter['layers']} layers): {short_count(adapter['parameters'])} parameters",
            )
        )
    rows.append(("tokenizer", tokenizer_summary(folder)))
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        print(f"{label:<{width}}{value}")
    return 0


def architecture(config: StableLmConfig) -> list[tuple[str, str]]:
    """Rows naming the shape and every variant flag of the model."""
    q, kv = config.num_attention_heads, config.num_key_value_heads
    kind = "MHA" if q == kv else "MQA" if kv == 1 else f"GQA, {config.num_kv_groups} query heads per group"
    rope = f"{config.rope_type}, theta {config.rope_theta:g}"
    if config.rope_scaling and "factor" in config.rope_scaling:
        rope += f", factor {config.rope_scaling['factor']:g}"
    rope += f", rotary dim {config.rotary_dim} of {config.head_dim}"

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    return [
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("MLP size", f"{config.intermediate_size} ({config.hidden_act})"),
        ("attention", f"{q} query heads, {kv} key/value heads ({kind}), head_dim {config.head_dim}"),
        ("rope", rope),
        ("context", f"{config.max_position_embeddings} positions"),
        ("vocab", str(config.vocab_size)),
        (
            "variant",
            f"qkv bias {yes(config.use_qkv_bias)}, q/k layernorm {yes(config.qk_layernorm)}, "
            f"parallel residual {yes(config.use_parallel_residual)}, "
            f"tied embeddings {yes(config.tie_word_embeddings)}",
        ),
    ]


def sizes(
    config: StableLmConfig, weights: WeightFiles, stored: list[torch.dtype], dtype: torch.dtype
) -> list[tuple[str, str]]:
    """Rows with the parameter count, the bytes on disk, and the bytes in memory as `dtype`."""
    params = parameter_count(config)
    on_disk = sum(path.stat().st_size for path in weights.files)
    files = f"{len(weights.files)} file{'s' if len(weights.files) > 1 else ''}"
    kv_per_token = kv_cache_per_token(config, dtype)
    return [
        ("parameters", f"{params:,} ({short_count(params)})"),
        ("on disk", f"{human_bytes(on_disk)} in {files} ({', '.join(name(d) for d in stored)})"),
        (
            "in memory",
            f"{human_bytes(params * dtype.itemsize)} as {name(dtype)}, "
            f"and {human_bytes(kv_per_token)} of KV cache per token",
        ),
    ]


def facts(
    source: str,
    config: StableLmConfig,
    weights: WeightFiles,
    stored: list[torch.dtype],
    dtype: torch.dtype,
    folder: Path,
) -> dict[str, Any]:
    """What the table shows, as one JSON-ready dict: config.json's names where it has one, bytes."""
    params = parameter_count(config)
    factor = (config.rope_scaling or {}).get("factor")
    return {
        "model": source,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rope_type": config.rope_type,
        "rope_theta": config.rope_theta,
        "rope_factor": factor,
        "rotary_dim": config.rotary_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "use_qkv_bias": bool(config.use_qkv_bias),
        "qk_layernorm": bool(config.qk_layernorm),
        "use_parallel_residual": bool(config.use_parallel_residual),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "parameters": params,
        "disk_bytes": sum(path.stat().st_size for path in weights.files),
        "weight_files": len(weights.files),
        "stored_dtypes": [name(d) for d in stored],
        "dtype": name(dtype),
        "memory_bytes": params * dtype.itemsize,
        "kv_cache_bytes_per_token": kv_cache_per_token(config, dtype),
        "tokenizer": tokenizer_facts(folder),
    }


def kv_cache_per_token(config: StableLmConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to the cache, every layer together."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def parameter_count(config: StableLmConfig) -> int:
    """The causal LM's distinct parameters (a tied head counted once), built on the meta device."""
    import torch

    from ..heads import StableLmForCausalLM

    with torch.device("meta"):
        model = StableLmForCausalLM(config)
    return model.num_parameters()


def stored_tensors(weights: WeightFiles) -> dict[str, StoredTensor]:
    """The stored tensors' dtypes and shapes by name, in file order (read from the headers)."""
    from ..checkpoint.readers import open_reader

    found: dict[str, StoredTensor] = {}
    for path in weights.files:
        reader = open_reader(path, weights.format)
        try:
            found.update(reader.tensors)
        finally:
            reader.close()
    return found


def tokenizer_facts(folder: Path) -> dict[str, Any] | None:
    """The tokenizer's size and whether it has a chat template; None without a tokenizer.json."""
    from ..tokenizer import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except FileNotFoundError:
        return None
    return {"tokens": len(tokenizer), "chat_template": tokenizer.chat_template is not None}


def tokenizer_summary(folder: Path) -> str:
    found = tokenizer_facts(folder)
    if found is None:
        return "none (no tokenizer.json)"
    template = "a chat template" if found["chat_template"] else "no chat template"
    return f"{found['tokens']:,} tokens, {template}"


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def short_count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _quantization(config: StableLmConfig, requested: str | None, folder: Path) -> Any:
    """The checkpoint's own quantization (checked against --quantize), or the one --quantize asks for."""
    from ..checkpoint.quantized import quantization_for

    return quantization_for(config, requested, folder)[0]


def quantized_size(config: StableLmConfig, quant: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's tensors with its linear layers quantized as `quant` (built on the meta device)."""
    import copy

    from ..checkpoint.fill import EmptyParameters
    from ..heads import StableLmForCausalLM
    from ..quantization.apply import quantized_bytes, replace_with_empty

    config = copy.deepcopy(config)
    with EmptyParameters():
        model = StableLmForCausalLM(config)
    model.to(dtype=dtype)
    if config.tie_word_embeddings:
        quant = copy.deepcopy(quant)
        quant.modules_to_not_convert = [*quant.modules_to_not_convert, "lm_head"]
    replace_with_empty(model, quant, dtype)
    return quantized_bytes(model)
