"""stablelm: a standalone, fast, exact implementation of the StableLM model family in PyTorch."""

from .cache import Cache, DynamicCache, StaticCache
from .checkpoint import CheckpointError
from .config import StableLmConfig
from .fast import optimize_for_inference
from .generation import GenerationConfig
from .heads import StableLmForCausalLM, StableLmForSequenceClassification, StableLmForTokenClassification
from .model import StableLmModel, StableLmPreTrainedModel
from .outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput
from .seeding import set_seed
from .streamers import TextIteratorStreamer, TextStreamer
from .tokenizer import AutoTokenizer, BatchEncoding, ChatTemplateError, StreamingDetokenizer, Tokenizer

# This package has one architecture, so the reference's Auto* names are aliases of its classes.
AutoConfig = StableLmConfig
AutoModel = StableLmModel
AutoModelForCausalLM = StableLmForCausalLM
AutoModelForSequenceClassification = StableLmForSequenceClassification
AutoModelForTokenClassification = StableLmForTokenClassification

__version__ = "0.1.0"

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "BatchEncoding",
    "ChatTemplateError",
    "CheckpointError",
    "BaseModelOutput",
    "Cache",
    "CausalLMOutput",
    "DynamicCache",
    "GenerationConfig",
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
    "optimize_for_inference",
    "Tokenizer",
    "set_seed",
]
