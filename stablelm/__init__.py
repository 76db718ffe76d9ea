"""stablelm: a standalone, fast, exact implementation of the StableLM model family in PyTorch.

The names below are imported when first used (PEP 562), so `import stablelm` itself is quick and does
not load torch; `from stablelm import StableLmForCausalLM` and `stablelm.StableLmForCausalLM` work as
usual, and so does `stablelm.<submodule>`.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name, and the submodule that defines it.
_LAZY: dict[str, str] = {
    "Cache": "cache",
    "DynamicCache": "cache",
    "StaticCache": "cache",
    "CheckpointError": "checkpoint",
    "QuantizationConfig": "quantization",
    "quantize": "quantization",
    "StableLmConfig": "config",
    "optimize_for_inference": "fast",
    "GenerationConfig": "generation",
    "StableLmForCausalLM": "heads",
    "StableLmForSequenceClassification": "classifiers",
    "StableLmForTokenClassification": "classifiers",
    "StableLmModel": "model",
    "StableLmPreTrainedModel": "model",
    "BaseModelOutput": "outputs",
    "CausalLMOutput": "outputs",
    "SequenceClassifierOutput": "outputs",
    "TokenClassifierOutput": "outputs",
    "set_seed": "seeding",
    "set_threads": "threads",
    "TextIteratorStreamer": "streamers",
    "TextStreamer": "streamers",
    "AutoTokenizer": "tokenizer",
    "BatchEncoding": "tokenizer",
    "ChatTemplateError": "tokenizer",
    "StreamingDetokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
}
# This package has one architecture, so the reference's Auto* names are aliases of its classes.
_ALIASES: dict[str, str] = {
    "AutoConfig": "StableLmConfig",
    "AutoModel": "StableLmModel",
    "AutoModelForCausalLM": "StableLmForCausalLM",
    "AutoModelForSequenceClassification": "StableLmForSequenceClassification",
    "AutoModelForTokenClassification": "StableLmForTokenClassification",
}

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "BaseModelOutput",
    "BatchEncoding",
    "Cache",
    "CausalLMOutput",
    "ChatTemplateError",
    "CheckpointError",
    "DynamicCache",
    "GenerationConfig",
    "QuantizationConfig",
    "SequenceClassifierOutput",
    "StableLmConfig",
    "StableLmForCausalLM",
    "StableLmForSequenceClassification",
    "StableLmForTokenClassification",
    "StableLmModel",
    "StableLmPreTrainedModel",
    "StaticCache",
    "StreamingDetokenizer",
    "TextIteratorStreamer",
    "TextStreamer",
    "TokenClassifierOutput",
    "Tokenizer",
    "demo_model_path",
    "quantize",
    "optimize_for_inference",
    "set_seed",
    "set_threads",
]

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .cache import Cache, DynamicCache, StaticCache
    from .checkpoint import CheckpointError
    from .classifiers import StableLmForSequenceClassification, StableLmForTokenClassification
    from .classifiers import StableLmForSequenceClassification as AutoModelForSequenceClassification
    from .classifiers import StableLmForTokenClassification as AutoModelForTokenClassification
    from .config import StableLmConfig
    from .config import StableLmConfig as AutoConfig
    from .fast import optimize_for_inference
    from .generation import GenerationConfig
    from .heads import StableLmForCausalLM
    from .heads import StableLmForCausalLM as AutoModelForCausalLM
    from .model import StableLmModel, StableLmPreTrainedModel
    from .model import StableLmModel as AutoModel
    from .outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput
    from .quantization import QuantizationConfig, quantize
    from .seeding import set_seed
    from .streamers import TextIteratorStreamer, TextStreamer
    from .threads import set_threads
    from .tokenizer import AutoTokenizer, BatchEncoding, ChatTemplateError, StreamingDetokenizer, Tokenizer


def demo_model_path(*, check: bool = True) -> Path:
    """The folder of the small demo model bundled with the package (`stablelm/assets/demo`).

    It holds a complete checkpoint (config.json, model.safetensors, tokenizer files) that needs no
    network: `StableLmForCausalLM.from_pretrained(stablelm.demo_model_path())` and
    `AutoTokenizer.from_pretrained(stablelm.demo_model_path())` load it. The command line uses it when
    no --model is given.

    Args:
        check: Raise when the folder holds no checkpoint (an install without the package's data files).

    Raises:
        FileNotFoundError: `check` is set and the folder has no config.json.
    """
    folder = Path(__file__).resolve().parent / "assets" / "demo"
    if check and not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The bundled demo model is missing: {folder} has no config.json. Reinstall stablelm with its "
            "data files (pip install --force-reinstall stablelm), or load another checkpoint."
        )
    return folder


def __getattr__(name: str) -> Any:
    """Import a public name's submodule when the name is first used, or a submodule by its name."""
    if name in _ALIASES:
        value = getattr(importlib.import_module(f".{_LAZY[_ALIASES[name]]}", __name__), _ALIASES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
