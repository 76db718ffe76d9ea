"""Key/value caches. They store tensors per layer and know nothing of the model.

Both caches take keys and values shaped (B, H_kv, T, D) with the absolute positions they occupy, and
return everything stored so far for the layer. `DynamicCache` grows by concatenation; `StaticCache`
preallocates `max_cache_len` slots so shapes never change (what compiled decoding needs) and returns all
slots: the attention mask hides the ones not yet written. `StaticCache.grow` enlarges it when asked
(generation past the model's context does, rather than preallocating every position up front).
"""

from __future__ import annotations

import torch


class Cache:
    """Common interface of the KV caches."""

    max_cache_len: int | None = None

    def get_seq_length(self) -> int:
        """Number of positions stored."""
        raise NotImplementedError

    def key_length(self, new_tokens: int) -> int:
        """Length of the keys that attention will see after storing `new_tokens` more positions."""
        raise NotImplementedError

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (B, H_kv, T, D) at positions `cache_position` (T,) and return the layer's keys/values."""
        raise NotImplementedError

    def advance(self, new_tokens: int) -> None:
        """Record that every layer stored `new_tokens` more positions (called once per forward)."""

    def select_batch(self, indices: torch.Tensor) -> None:
        """Reorder the batch rows: row i becomes row `indices[i]` (beam search's reordering)."""
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """The reference's name of `select_batch`."""
        self.select_batch(beam_idx)


class DynamicCache(Cache):
    """A cache that grows with every call; positions must be appended in order."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def key_length(self, new_tokens: int) -> int:
        return self.get_seq_length() + new_tokens

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows `indices`."""
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]


class StaticCache(Cache):
    """A preallocated cache of `max_cache_len` positions per layer, for fixed shapes under compilation.

    Args:
        num_layers: Number of decoder layers.
        batch_size: Rows in the batch.
        num_kv_heads: Key/value heads per layer.
        head_dim: Channels per head.
        max_cache_len: Positions to preallocate (prompt plus everything to be generated).
        dtype: dtype of the stored keys/values (the model's).
        device: Where to allocate.
        zeroed: Fill the slots with zeros up front. Attention over every slot (compiled decoding) needs
            it: a masked slot still meets its value with weight 0, and 0 * NaN is NaN. Eager attention reads
            written slots only, so it can skip the fill, which also leaves memory untouched (and out of
            the resident set) until it is written.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_cache_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        zeroed: bool = True,
    ) -> None:
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be at least 1, got {max_cache_len}.")
        shape = (batch_size, num_kv_heads, max_cache_len, head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.keys = [new(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [new(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_cache_len = max_cache_len
        self.zeroed = zeroed
        self._length = 0

    @classmethod
    def for_model(
        cls,
        config,  # noqa: ANN001 - a StableLmConfig; this module imports nothing of the model's
        *,
        batch_size: int,
        max_cache_len: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        zeroed: bool = True,
    ) -> StaticCache:
        """A cache sized for a model with `config` (a StableLmConfig)."""
        return cls(
            num_layers=config.num_hidden_layers,
            batch_size=batch_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            max_cache_len=max_cache_len,
            dtype=dtype,
            device=device,
            zeroed=zeroed,
        )

    def get_seq_length(self) -> int:
        return self._length

    def key_length(self, new_tokens: int) -> int:
        if self._length + new_tokens > self.max_cache_len:
            raise ValueError(
                f"The static cache holds {self.max_cache_len} positions; {self._length} are used and "
                f"{new_tokens} more do not fit. Create it with a larger max_cache_len."
            )
        return self.max_cache_len

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        k_cache.index_copy_(2, cache_position, key.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, value.to(v_cache.dtype))
        return k_cache, v_cache

    def advance(self, new_tokens: int) -> None:
        # Kept out of `update` so that a compiled step changes no Python state.
        self._length += new_tokens

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions (speculative decoding's rollback). The slots after them
        keep stale values, which attention never reads (eager attention reads the stored positions only,
        compiled steps mask them) and later writes overwrite."""
        if not 0 <= length <= self._length:
            raise ValueError(
                f"crop length must be in [0, {self._length}] (the stored positions), got {length}."
            )
        self._length = length

    def grow(self, max_cache_len: int) -> None:
        """Enlarge to `max_cache_len` slots, keeping the stored positions (each layer's tensors are
        replaced by larger ones, one at a time, so the extra memory at any moment is one layer's)."""
        if max_cache_len <= self.max_cache_len:
            return
        new = torch.zeros if self.zeroed else torch.empty
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                grown = new((*old.shape[:2], max_cache_len, old.shape[3]), dtype=old.dtype, device=old.device)
                grown[:, :, : self._length] = old[:, :, : self._length]
                tensors[i] = grown
                del old
        self.max_cache_len = max_cache_len

    def select_batch(self, indices: torch.Tensor) -> None:
        """Reorder the batch rows in place (the buffers stay, so a compiled step keeps its inputs);
        `indices` has one entry per row."""
        if indices.shape[0] != self.keys[0].shape[0]:
            raise ValueError(
                f"A static cache keeps its {self.keys[0].shape[0]} rows: pass that many indices, got "
                f"{indices.shape[0]}."
            )
        n = self._length  # the slots past it hold nothing yet
        for t in (*self.keys, *self.values):
            t[:, :, :n] = t[:, :, :n].index_select(0, indices.to(t.device))

    def reset(self) -> None:
        """Forget every stored position (the buffers are reused)."""
        self._length = 0
        for t in (*self.keys, *self.values):
            t.zero_()


def check_cache(cache: object, what: str = "past_key_values") -> None:
    """A TypeError naming `what` unless `cache` is None or one of stablelm's caches (transformers' own, or
    the legacy tuples, are not read here)."""
    if cache is not None and not isinstance(cache, Cache):
        kind = type(cache)
        raise TypeError(
            f"{what} must be a stablelm cache, got {kind.__module__}.{kind.__qualname__}: pass "
            "stablelm.DynamicCache() (or stablelm.StaticCache(...), or the past_key_values a previous generate or "
            "forward of a stablelm model returned); transformers' caches are not read here."
        )
