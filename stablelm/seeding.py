"""Seeding every random generator a run may draw from."""

from __future__ import annotations

import random

import torch


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's `random`, NumPy (when installed) and torch on every device.

    Args:
        seed: The seed.
        deterministic: Also ask torch for deterministic algorithms (slower on GPU).
    """
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
