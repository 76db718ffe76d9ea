"""The one-token decode step over a static cache, with fixed shapes so that it can be compiled.

Compiled, everything that changes from step to step is a tensor argument (token, position, cache
slot, key mask), never a Python number, so one graph (Inductor, weights frozen) serves every step of
every generation with the same batch size and cache-length bucket. Eager, the step attends over the
written slots only, so it matches a dynamic cache bit for bit.

Freezing makes the weights constants of the graph and Inductor fuses the small operations around the
products. On the CPU the linear layers stay stablelm's (the `stablelm::linear` operator, which picks
its kernel as eager calls do) over the weights as they are: no second copy. With kernels switched off
(`optimize=False`), Inductor packs the weights for oneDNN itself (a second copy in memory).
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Callable

import torch

from .attention import AttentionMask
from .cache import StaticCache
from .greedy_head import screen_for
from .lean_step import LeanStep

_NOTICE_SHOWN: set[str] = set()


def _decode_step(
    model: torch.nn.Module,
    cache: StaticCache,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    cache_position: torch.Tensor,
    key_mask: torch.Tensor | None,
    key_length: int,
) -> torch.Tensor:
    """fp32 logits (B, V) of the next token after `tokens` (B, 1) at rotary positions (B, 1).

    `cache_position` (1,) is the slot the step writes. `key_mask` (B, key_length) marks the slots the new
    token may attend to (written slots holding real tokens, and its own), or is None when all may be.
    Compiled, `key_length` is every slot of the cache (fixed shapes); eager, the written ones only, so
    that attention sees exactly what it sees with a dynamic cache.
    """
    base = model.model
    x = base.embed_tokens(tokens)  # (B, 1, C)
    rope = base.rotary_emb(x, position_ids)
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    mask = AttentionMask(allowed=allowed, is_causal=False, key_length=key_length)
    for layer in base.layers:
        x = layer(x, rope, mask, cache, cache_position)
    x = base.norm(x)
    return model.lm_head(x[:, -1]).float()


class DecodeStep:
    """Runs the decode step, compiled when asked and possible, eager otherwise.

    Args:
        model: A StableLmForCausalLM in eval mode.
        compile: Compile with torch.compile (Inductor, weights frozen). On failure, fall back to eager
            with a one-line notice on stderr.
    """

    def __init__(self, model: torch.nn.Module, *, compile: bool = False) -> None:
        self.model = model
        self.compile_seconds: float | None = None
        self._fn: Callable[..., torch.Tensor] = _decode_step
        self._compiled = compile
        self._weights: tuple[tuple[int, int], ...] = ()  # what the compiled graph froze
        self.lean = True  # False: the eager step always runs the modules (tests compare the two)
        # per Python thread (the plan's buffers are reused every step): (rows, threads) and the plan
        self._plans = threading.local()
        self._screen: dict = {}  # the head's int8 screen for greedy steps (`stablelm.greedy_head`), once made
        if compile:
            self._fn = _new_compiled_step()

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, compile: bool) -> DecodeStep:
        """The model's decode step, kept on the model so that compilation is paid once per model and shape."""
        steps = model.__dict__.setdefault("_stablelm_decode_steps", {})
        if compile not in steps:
            steps[compile] = cls(model, compile=compile)
        step = steps[compile]
        step._plans.key = None  # planned anew per generation: the modules may have changed
        step._screen["checked"] = False  # the head's screen is checked against the weight's values again
        # Once per generation (weights do not change within one): the compiled graph holds them as frozen
        # constants, so when they have changed (in place, loaded, replaced) it is compiled anew rather
        # than run on stale weights.
        if step.compile_seconds is not None and _weights_signature(model) != step._weights:
            step._fn, step.compile_seconds = _new_compiled_step(), None
        return step

    def __call__(
        self,
        cache: StaticCache,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        key_mask: torch.Tensor,
        *,
        padded: bool = True,
    ) -> torch.Tensor:
        """Run one step. `key_mask` (B, S) covers every slot; `padded` False says it holds no padding."""
        logits = (
            self._compiled_step(cache, tokens, position_ids, cache_position, key_mask)
            if self._compiled
            else None
        )
        if logits is None:
            length = cache.get_seq_length() + tokens.shape[1]
            mask = key_mask[:, :length] if padded else None
            lean = self._lean_step(cache, tokens)
            if lean is not None:
                logits = lean(cache, tokens, position_ids, mask)
            else:
                logits = _decode_step(self.model, cache, tokens, position_ids, cache_position, mask, length)
        cache.advance(tokens.shape[1])
        return logits

    def greedy(
        self,
        cache: StaticCache,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        key_mask: torch.Tensor,
        *,
        padded: bool = True,
        banned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run one step of a greedy generation of one row: (the next token (1,), None) where the head's
        int8 screen decides it (`stablelm.greedy_head`: the argmax of the logits, `banned` ids excluded),
        else (None, the logits) as `__call__` returns them."""
        lean = None if self._compiled else self._lean_step(cache, tokens)
        found = None if lean is None or tokens.shape[0] != 1 else lean.head_kernel()
        screen = None if found is None else screen_for(self._screen, *found)
        if screen is None:
            return None, self(cache, tokens, position_ids, cache_position, key_mask, padded=padded)
        length = cache.get_seq_length() + tokens.shape[1]
        x = lean.hidden(cache, tokens, position_ids, key_mask[:, :length] if padded else None)
        cache.advance(tokens.shape[1])
        token = screen.choose(x, banned)
        return (token, None) if token is not None else (None, lean.logits(x))

    def __getstate__(self) -> dict:
        # copies and pickles of the model carry no plan (it holds ctypes functions and this model's
        # tensors) and no screen (a copy of the head): the copy makes its own at its first step
        return {**self.__dict__, "_plans": None, "_screen": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _plans=threading.local())
        self.__dict__.setdefault("_screen", {})

    def _lean_step(self, cache: StaticCache, tokens: torch.Tensor) -> LeanStep | None:
        """The planned eager step (`stablelm.lean_step`) for this generation, or None: the modules run.
        Planned at a generation's first step (`for_model` forgets the plan), again if the rows or
        threads change."""
        if not self.lean:
            return None
        plans = self._plans
        plan = getattr(plans, "plan", None) if getattr(plans, "key", None) is not None else None
        if plan is None or not plan.fits(cache, tokens):
            key = (tokens.shape[0], torch.get_num_threads())
            if getattr(plans, "key", None) == key:  # already found not to apply
                return None
            plans.key = key
            plan = plans.plan = LeanStep.build(self.model, cache, tokens.shape[0])
            if plan is not None and not plan.fits(cache, tokens):
                plan = plans.plan = None
        return plan

    def _compiled_step(self, cache: StaticCache, *inputs: torch.Tensor) -> torch.Tensor | None:
        """The compiled step over every slot; None (and eager from then on) when compilation fails."""
        args = (self.model, cache, *inputs, inputs[-1].shape[-1])
        if self.compile_seconds is not None:
            with _freezing():
                return self._fn(*args)
        weights = _weights_signature(self.model)
        start = time.perf_counter()
        try:
            with _freezing():
                logits = self._fn(*args)
        except Exception as err:  # compilation needs a C++ toolchain (CPU) or Triton (GPU)
            _notice(f"stablelm: compiling the decode step failed ({type(err).__name__}); running eager.")
            self._compiled = False
            return None
        self.compile_seconds = time.perf_counter() - start
        self._weights = weights
        return logits


def _new_compiled_step() -> Callable[..., torch.Tensor]:
    """`_decode_step` compiled, over its own copy of the code object.

    torch.compile keeps compiled graphs (and their recompilation limit) per code object: a copy per
    model keeps models from evicting each other's graphs, and dropping it frees the frozen weights.
    """
    code = _decode_step.__code__.replace()
    fn = types.FunctionType(code, _decode_step.__globals__, _decode_step.__name__)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _weights_signature(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Storage and in-place version of every parameter and buffer: changes whenever a weight does."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _freezing():  # noqa: ANN202
    """Inductor's freezing (weights become packed constants), read when a graph compiles.

    `torch.compile(options={"freezing": True})` does not reach the freezing pass in torch 2.13 (the
    weights stay graph inputs and multiply through plain `mm`); the global config, patched here, does.
    """
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


def _notice(message: str) -> None:
    if message not in _NOTICE_SHOWN:
        _NOTICE_SHOWN.add(message)
        print(message, file=sys.stderr)
