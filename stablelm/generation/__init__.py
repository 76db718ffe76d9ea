"""Generation: settings (`config`), the decode loop (`loop`) and stop strings (`stop`)."""

from .config import UNSET, GenerationConfig, resolve_config
from .loop import Step, TokenStreamer, generate, prepare_inputs, stream_tokens
from .stop import StopStringChecker

__all__ = [
    "UNSET",
    "GenerationConfig",
    "Step",
    "StopStringChecker",
    "TokenStreamer",
    "generate",
    "prepare_inputs",
    "resolve_config",
    "stream_tokens",
]
