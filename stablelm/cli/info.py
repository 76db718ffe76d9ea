"""Describe a checkpoint: its architecture, parameter count, and size on disk and in memory.

Reads config.json, the weight files' headers and the tokenizer files; no weights are loaded.

examples:
  stablelm info -m stabilityai/stablelm-2-1_6b
  stablelm info -m ./my-model --dtype float16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint.layout import WeightFiles, find_weights, resolve_folder
from ..checkpoint.load import resolve_dtype
from ..checkpoint.readers import open_reader
from ..config import StableLmConfig
from ..heads import StableLmForCausalLM
from ..tokenizer import AutoTokenizer
from .loading import model_source
from .options import DTYPES, add_model_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the dtype to size the weights in memory for (default: auto, the checkpoint's)",
    )


def run(args: argparse.Namespace) -> int:
    source = model_source(args.model)
    folder = resolve_folder(source, revision=None, cache_dir=None, local_files_only=False, token=None)
    config = StableLmConfig.from_pretrained(folder)
    weights = find_weights(folder)
    stored = stored_dtypes(weights)
    if args.dtype != "auto":
        dtype = resolve_dtype(args.dtype)
    elif config.torch_dtype is not None:
        dtype = resolve_dtype(config.torch_dtype)
    else:
        dtype = next((d for d in stored if d.is_floating_point), torch.float32)
    rows = [("model", source), *architecture(config)]
    rows += sizes(config, weights, stored, dtype)
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
    kv_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    )
    return [
        ("parameters", f"{params:,} ({short_count(params)})"),
        ("on disk", f"{human_bytes(on_disk)} in {files} ({', '.join(name(d) for d in stored)})"),
        (
            "in memory",
            f"{human_bytes(params * dtype.itemsize)} as {name(dtype)}, "
            f"and {human_bytes(kv_per_token)} of KV cache per token",
        ),
    ]


def parameter_count(config: StableLmConfig) -> int:
    """The causal LM's distinct parameters (a tied head counted once), built on the meta device."""
    with torch.device("meta"):
        model = StableLmForCausalLM(config)
    return model.num_parameters()


def stored_dtypes(weights: WeightFiles) -> list[torch.dtype]:
    """The dtypes of the stored tensors, in order of first appearance (read from the headers)."""
    found: dict[torch.dtype, None] = {}
    for path in weights.files:
        reader = open_reader(path, weights.format)
        try:
            found.update(dict.fromkeys(stored.dtype for stored in reader.tensors.values()))
        finally:
            reader.close()
    return list(found)


def tokenizer_summary(folder: Path) -> str:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except FileNotFoundError:
        return "none (no tokenizer.json)"
    template = "a chat template" if tokenizer.chat_template is not None else "no chat template"
    return f"{len(tokenizer):,} tokens, {template}"


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
