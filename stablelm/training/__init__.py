"""Training and fine-tuning: data, optimiser, loop with exact resume, and tokenizer training.

`data` reads text and JSON-lines files and packs their tokens into blocks, `optim` builds AdamW and its
warmup-cosine schedule, `arguments` holds a run's settings, `checkpoints` writes and restores training
checkpoints atomically (and checks an output folder before a run), `trainer` runs the loop, `losses` weighs
its micro-batches over ranks and takes the held-out loss, `sources` sets
up the model and tokenizer a run starts from, `memory` estimates whether a run fits before it allocates,
`tokenizer_training` trains a byte-level BPE tokenizer, `chat` renders and labels conversations (loss on the
assistant's tokens), `packing` packs them whole into blocks (in memory or into a cached file), `lora` adds,
saves and applies peft LoRA adapters, `corpus` streams large data (text or chat) through worker processes into
a token cache (`parquet` reads Parquet files for it), `distributed` runs the loop data-parallel under torchrun
(DDP or FSDP2), and `wording` writes counts in messages. The `stablelm train` and
`stablelm train-tokenizer` commands drive them.
"""

from .arguments import TrainingArguments
from .checkpoints import check_output_dir
from .corpus import TokenStream, tokenize_files
from .data import BlockOrder, check_block_size, check_text, pack, read_documents, split_blocks, tokenize
from .distributed import Distributed
from .memory import (
    InsufficientMemoryError,
    MemoryEstimate,
    check_training_memory,
    estimate_training_memory,
)
from .optim import build_optimizer, learning_rate_at, parameter_groups
from .tokenizer_training import train_tokenizer
from .trainer import Trainer, TrainingEvent, TrainingState

__all__ = [
    "BlockOrder",
    "Distributed",
    "InsufficientMemoryError",
    "MemoryEstimate",
    "Trainer",
    "TrainingArguments",
    "TrainingEvent",
    "TrainingState",
    "TokenStream",
    "build_optimizer",
    "check_block_size",
    "check_output_dir",
    "check_text",
    "check_training_memory",
    "estimate_training_memory",
    "learning_rate_at",
    "pack",
    "parameter_groups",
    "read_documents",
    "split_blocks",
    "tokenize",
    "tokenize_files",
    "train_tokenizer",
]
