"""Which model a command uses (--model, else the bundled demo) and loading it with its tokenizer.

torch and the model's modules are imported by `load`, not here, so that --help stays quick.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import demo_model_path
from .errors import UsageError

if TYPE_CHECKING:
    import torch

    from ..heads import StableLmForCausalLM
    from ..tokenizer import Tokenizer

DEMO_DIR = demo_model_path(check=False)


def model_source(name_or_path: str | None) -> str:
    """`--model` as given, else the bundled demo checkpoint's folder.

    Raises:
        UsageError: No model was given and the demo checkpoint is not installed.
    """
    if name_or_path:
        return name_or_path
    if (DEMO_DIR / "config.json").is_file():
        return str(DEMO_DIR)
    raise UsageError("no model given and no bundled demo model is installed: pass --model NAME_OR_PATH")


@dataclass
class Loaded:
    """A model ready to generate, with its tokenizer, where it came from and how long loading took."""

    source: str
    model: StableLmForCausalLM
    tokenizer: Tokenizer
    seconds: float
    adapter: str | None = None

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A generator seeded with `seed` on the model's device; None (torch's global one) without a seed."""
        import torch

        if seed is None:
            return None
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def describe(self) -> str:
        """One line for --verbose: what was loaded, how, and how fast."""
        dtype = str(self.model.dtype).removeprefix("torch.")
        quant = self.model.config.extra.get("quantization_config")
        if quant:
            dtype += f", weights {quant['quant_type']}"
        source = self.source + (f" with adapter {self.adapter}" if self.adapter else "")
        return f"load: {source} in {self.seconds:.2f} s ({dtype} on {self.model.device})"


def load(args: argparse.Namespace) -> Loaded:
    """The tokenizer (first: it is quick, and fails fast on a folder without one), then the model."""
    from ..fast import optimize_for_inference
    from ..heads import StableLmForCausalLM
    from ..tokenizer import AutoTokenizer

    source = model_source(args.model)
    adapter = getattr(args, "adapter", None)
    if adapter is not None and getattr(args, "quantize", None):
        raise UsageError(
            "--adapter and --quantize: an adapter is merged into full-precision weights; merge it first "
            "('stablelm train ... --merge' writes the merged model) and quantize that"
        )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = StableLmForCausalLM.from_pretrained(
        source, dtype=args.dtype, device=args.device, quantization_config=getattr(args, "quantize", None)
    )
    if adapter is not None:
        from ..training.lora import apply_adapter

        model = apply_adapter(model, adapter)
    optimize_for_inference(model)  # frozen parameters: plain calls take the fast path too
    return Loaded(source, model, tokenizer, time.perf_counter() - start, adapter)
