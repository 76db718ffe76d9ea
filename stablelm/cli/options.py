"""The options several commands share: which model and how to load it, how to sample, how to report.

Values are checked here, by argparse, so that a bad one is a usage error (exit 2) before any model loads.
Nothing here imports torch (the generation functions import it when called), so --help stays quick.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CliError

if TYPE_CHECKING:
    from ..generation import GenerationConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")

# Sampling when the checkpoint's generation_config.json sets none: llama.cpp's defaults.
CLI_SAMPLING: dict[str, Any] = dict(
    do_sample=True, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0
)
_SAMPLING_KEYS = tuple(CLI_SAMPLING)
# Rope types that extend past max_position_embeddings (as stablelm.generation's length check has them).
EXTENDING_ROPE_TYPES = ("dynamic", "yarn", "longrope", "llama3")


def _model_name(text: str) -> str:
    """argparse `type` of -m/--model: anything but an empty or blank name (an unset shell variable, which
    would otherwise run the demo model unannounced)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "empty: pass a checkpoint folder or a hub id (leave -m out for the bundled demo model)"
        )
    return text


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes without wrapping


def seed_type(text: str) -> int:
    """argparse `type` of --seed: an integer torch's generators take as it is."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1, got {text!r}")
    return value


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        type=_model_name,
        metavar="NAME_OR_PATH",
        help="a checkpoint folder or a Hugging Face hub id (default: the bundled demo model)",
    )


def add_load_options(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights' dtype (default: auto, the checkpoint's own)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to run (default: auto, CUDA when available)"
    )
    add_quantize_option(parser)
    add_adapter_option(parser)


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        metavar="PATH",
        help="a peft LoRA adapter folder (as 'stablelm train --lora-r' writes) to apply to the model, merged "
        "into its weights while loading (needs peft)",
    )


QUANTIZE_CHOICES = ("int8", "int4")


def add_quantize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="quantize the linear layers' weights while loading (weight-only: int8 per channel, int4 in "
        "groups of 128); a checkpoint saved quantized needs no flag",
    )


def add_sampling_options(parser: argparse.ArgumentParser, *, default_new_tokens: int) -> None:
    group = parser.add_argument_group(
        "sampling",
        "Defaults: the checkpoint's generation_config.json when it sets sampling options, else\n"
        "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05 (llama.cpp's). --temperature 0 is greedy.",
    )
    group.add_argument(
        "-n",
        "--max-new-tokens",
        type=bounded(int, low=1),
        metavar="N",
        help=f"most tokens to generate (default: {default_new_tokens}, within the model's context)",
    )
    group.add_argument("--temperature", type=bounded(float, low=0.0), metavar="T", help="0 is greedy")
    group.add_argument("--top-k", type=bounded(int, low=0), metavar="K", help="0 turns it off")
    group.add_argument(
        "--top-p", type=bounded(float, low=0.0, high=1.0, open_low=True), metavar="P", help="1 turns it off"
    )
    group.add_argument("--min-p", type=bounded(float, low=0.0, high=1.0), metavar="P", help="0 turns it off")
    group.add_argument(
        "--repetition-penalty",
        type=bounded(float, low=0.0, open_low=True),
        metavar="R",
        help="above 1 discourages repeats; 1 turns it off",
    )
    group.add_argument("--seed", type=seed_type, help="seed the sampler, so a run can be repeated")


def add_output_options(parser: argparse.ArgumentParser, *, json_help: str | None = None) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report load time, threads, token counts and speed on stderr",
    )
    if json_help:
        add_json_option(parser, json_help)


def add_json_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile: faster tokens after about a minute of compiling",
    )


def compile_notice() -> None:
    """The line --compile prints before it goes quiet for a while."""
    print(
        "stablelm: compiling the decode step (torch.compile); the first tokens take about a minute",
        file=sys.stderr,
        flush=True,
    )


def bounded(
    kind: type,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> Callable[[str], Any]:
    """An argparse `type` that parses `kind` and checks it lies in [low, high] ((low, high] if open_low)."""
    name = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        wanted = f"{name} in {'(' if open_low else '['}{low:g}, {high:g}]"
    elif low is not None:
        wanted = f"{name} {'>' if open_low else '>='} {low:g}"
    else:
        wanted = name

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    return parse


def sampling_settings(file_config: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keyword arguments of `resolve_config`: the checkpoint's (when it sets any), else
    CLI_SAMPLING, then the flags given."""
    settings: dict[str, Any] = {}
    if not file_config or not any(key in file_config for key in _SAMPLING_KEYS):
        settings.update(CLI_SAMPLING)
    if args.temperature is not None:
        settings.update(do_sample=args.temperature > 0, temperature=args.temperature)
    flags = {
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    return settings


class PromptTooLong(CliError):
    """The prompt leaves no room in the model's context for a single new token."""


def context_room(model_config: Any, prompt_tokens: int) -> int | None:
    """Positions the model's context has left after a prompt of `prompt_tokens` (negative when the prompt
    overflows it); None for a rope type that extends past max_position_embeddings."""
    if getattr(model_config, "rope_type", None) in EXTENDING_ROPE_TYPES:
        return None
    return model_config.max_position_embeddings - prompt_tokens


def check_prompt_fits(model_config: Any, prompt_tokens: int, *, what: str = "the prompt") -> None:
    """Raise PromptTooLong, with what to do at the shell, when `what` leaves no room for new text."""
    room = context_room(model_config, prompt_tokens)
    if room is not None and room < 1:
        context = model_config.max_position_embeddings
        raise PromptTooLong(
            f"{what} has {prompt_tokens} tokens, and the model's context holds {context} (the prompt and "
            f"the new text together): shorten it to under {context} tokens, or use a model with a longer "
            "context (-m)"
        )


def generation_config(
    model: Any, tokenizer: Any, args: argparse.Namespace, *, prompt_tokens: int, default_new_tokens: int
) -> GenerationConfig:
    """The settings of one generation: the checkpoint's, the CLI's sampling defaults and the flags.

    Generation stops at the model's EOS tokens and at the tokenizer's (the end of a chat turn). At most
    -n tokens (default `default_new_tokens`), and never past the model's context: a larger -n is
    lowered to the room left (said once, with --verbose).

    Raises:
        PromptTooLong: The prompt fills the context.
    """
    from ..generation import resolve_config
    from ..generation.plan import sampling_params

    check_prompt_fits(model.config, prompt_tokens)
    requested = args.max_new_tokens if args.max_new_tokens is not None else default_new_tokens
    room = context_room(model.config, prompt_tokens)
    max_new = requested if room is None else min(requested, room)
    if max_new < requested and args.max_new_tokens is not None and args.verbose:
        if not getattr(args, "context_noted", False):
            args.context_noted = True
            print(
                f"stablelm: -n {requested} is more than the {room} positions left in the model's context "
                f"({model.config.max_position_embeddings}): generating at most {max_new} tokens",
                file=sys.stderr,
            )
    try:
        config = resolve_config(
            model, None, max_new_tokens=max_new, **sampling_settings(model.generation_config.to_dict(), args)
        )
        sampling_params(config)  # checked here, to name the file
    except (TypeError, ValueError) as err:  # the flags were checked already: a value of the checkpoint's file
        source = Path(getattr(model, "name_or_path", "") or ".") / "generation_config.json"
        raise CliError(
            f"{source}: {err} Fix the file, or override the setting with its flag (--temperature, --top-k, "
            "--top-p, --min-p, --repetition-penalty)"
        ) from None
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for extra in [tokenizer.eos_token_id, *getattr(args, "extra_eos_ids", [])]:
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    return config.updated(eos_token_id=eos_ids or None, compile=bool(getattr(args, "compile", False)))


def describe_sampling(config: Any, *, seed: int | None) -> str:
    """One line naming how tokens are chosen, for --verbose."""
    if not config.do_sample or config.temperature == 0:
        return "greedy"
    parts = [f"temperature {config.temperature:g}"]
    if config.top_k:
        parts.append(f"top-k {config.top_k}")
    if config.top_p is not None and config.top_p < 1:
        parts.append(f"top-p {config.top_p:g}")
    if config.min_p:
        parts.append(f"min-p {config.min_p:g}")
    if config.repetition_penalty not in (None, 1.0):
        parts.append(f"repetition penalty {config.repetition_penalty:g}")
    parts.append(f"seed {seed}" if seed is not None else "unseeded")
    return ", ".join(parts)
