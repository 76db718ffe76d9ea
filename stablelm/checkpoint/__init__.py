"""Checkpoints in the Hugging Face layout: find them (folder or hub), load them exactly, save them.

`layout` knows the folder and its files, `readers` reads tensors out of them, `plan` matches their
names and shapes to a model's, `load` fills the model, `save` writes one. The model classes' `from_pretrained` / `save_pretrained` are the doors in.
"""

from .layout import CheckpointError
from .load import load_pretrained
from .save import save_pretrained

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained"]
