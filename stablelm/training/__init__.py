"""Training and fine-tuning: data, optimiser, loop with exact resume, and tokenizer training.

`data` reads text and JSON-lines files and packs their tokens into blocks, `optim` builds AdamW and its
warmup-cosine schedule, `arguments` holds a run's settings, `checkpoints` writes and restores training
checkpoints atomically, `trainer` runs the loop, `sources` sets up the model and tokenizer a run starts
from, and `tokenizer_training` trains a byte-level BPE tokenizer. The `stablelm train` and
`stablelm train-tokenizer` commands drive them.
"""

from .arguments import TrainingArguments
from .data import BlockOrder, pack, read_documents, split_blocks, tokenize
from .optim import build_optimizer, learning_rate_at, parameter_groups
from .tokenizer_training import train_tokenizer
from .trainer import Trainer, TrainingEvent, TrainingState, check_block_size

__all__ = [
    "BlockOrder",
    "Trainer",
    "TrainingArguments",
    "TrainingEvent",
    "TrainingState",
    "build_optimizer",
    "check_block_size",
    "learning_rate_at",
    "pack",
    "parameter_groups",
    "read_documents",
    "split_blocks",
    "tokenize",
    "train_tokenizer",
]
