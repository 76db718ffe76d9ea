"""Generation: settings (`config`), logits processors (`processors`), the prompt's checks (`prompt`), the
decode loop (`loop`), beam search (`beam`), the `generate` call (`call`), its output records (`outputs`),
stop strings (`stop`) and speculative decoding (`speculative` checks drafts, `drafts` makes them)."""

from .config import UNSET, GenerationConfig, resolve_config
from .loop import Step, TokenStreamer, generate, stream_tokens
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .prompt import prepare_inputs
from .stop import StopStringChecker

__all__ = [
    "UNSET",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "Step",
    "StopStringChecker",
    "TokenStreamer",
    "generate",
    "prepare_inputs",
    "resolve_config",
    "stream_tokens",
]
