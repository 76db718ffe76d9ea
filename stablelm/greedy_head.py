"""Greedy decoding's next token without reading the whole bfloat16 LM head: an exact int8 screen.

A greedy step needs the argmax of the head's logits, not the logits. `GreedyHead` keeps an int8 copy of
the head (one float32 scale per row, half the bytes of bfloat16) and, for each row i, a bound B_i (see
`stablelm_q8_screen_prepare` in kernels/quant_screen.h). Each step:

1. a = the int8 head's logits for x (the final layer norm's output, one row; float32 sums), the banned
   ids (the step's processors: min_new_tokens, suppress_tokens, ...) set to -inf;
2. every logit torch computes (bfloat16 weights and x, float32 sums in any order, one rounding to
   bfloat16) lies within e_i of a_i, with E_i = B_i |x|_2 + tiny and e_i = 1.01 E_i + 2^-7 |a_i|:
   |x.w_i - a_i| <= |x|_2 |w_i - s_i q_i|_2 (Cauchy-Schwarz) plus both sides' float32 rounding, at most
   2 (K + 16) 2^-24 |x|_2 (|w_i|_2 + |s_i q_i|_2), plus flushed denormals (`tiny`), then the final
   rounding to bfloat16 (relative 2^-8 of at most |a_i| + E_i);
3. with L = max_i (a_i - e_i), a row whose a_i + e_i < L has a logit below L, and L is at most the row
   that defines it, whose logit is at most the largest: so every row that holds the largest logit
   (ties included) is among the candidates a_i + e_i >= L;
4. the candidates' logits are computed by the head's own kernel in the same order as the whole head
   (the 16-row blocks that hold them, gathered, as the kernel computes every block of 16 rows alike),
   and the first of the largest is the token: torch.argmax's answer over the whole processed scores.

So the tokens are those of the full head, bit for bit in the decision; what it saves is about half the
head's bytes each step (the head is 30% of a 160M model's bytes per token, 5% of a 3B one's). It is used
where it pays: the screen is timed against the full head once per model and thread count (`PAYS`), and
where anything is unusual (a score not finite, too many candidates) the step computes every logit. It
serves one row at a time, bfloat16 heads on a native kernel (`stablelm.lean_step`), greedy generations
that keep no scores.
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

from .kernels import call, kernel, quant_library

BLOCK = 16  # the head kernel's rows per block: candidates are computed in whole aligned blocks
MAX_BLOCKS = 32  # blocks that may hold the argmax; more (a flat distribution): every logit is computed
PAYS = 0.85  # the screen is used where it takes at most this share of the full head's time
MIN_HEAD_BYTES = 4 << 20  # smaller heads stay in the caches, where the full head is as cheap as the screen
FORCE: bool | None = None  # tests: True screens any head without timing it, False never screens
_BUILD = threading.Lock()


class GreedyHead:
    """The int8 screen of one bfloat16 head weight (N, K), for the `kind` kernel with K block `block`."""

    def __init__(self, weight: torch.Tensor, kind: str, block: int) -> None:
        lib = quant_library()
        if lib is None:
            raise ValueError("the quantized kernels are not built here")
        n, k = weight.shape
        self.weight, self.kind, self.block = weight, kind, block  # the weight kept: see `serves`
        self.fn, self.lib = kernel(kind), lib
        self.key = _key(weight, kind, block)
        self.q = torch.empty(n, k, dtype=torch.int8)
        self.scale = torch.empty(n, dtype=torch.float32)
        self.bound = torch.empty(n, dtype=torch.float32)
        most = ctypes.c_float(0.0)  # the largest row norm
        status = lib.stablelm_q8_screen_prepare(
            weight.data_ptr(), n, k, self.q.data_ptr(), self.scale.data_ptr(), self.bound.data_ptr(),
            ctypes.byref(most), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise ValueError("the head's weight is not finite" if status == 4 else "bad screen arguments")
        wmax = most.value
        self.digest = self.weight_digest(weight)
        # products with a denormal factor and sums flushed to zero, each at most 2^-126 (|x| + |w| + 1)
        self.tiny, self.tiny_per_x = 2.0 * (k + 1) * 2.0**-126 * (wmax + 1.0), 2.0 * (k + 1) * 2.0**-126
        self.nx_max = 1e36 / (wmax + 1.0)  # |x|_2 beyond this: a logit might overflow; not screened
        self._work = threading.local()  # each thread's buffers (`_buffers`): generations may run side by side
        self.pays: dict[int, bool] = {}  # per thread count

    def weight_digest(self, weight: torch.Tensor) -> int:
        """A digest of the weight's values (see `stablelm_q8_screen_digest`)."""
        return self.lib.stablelm_q8_screen_digest(weight.data_ptr(), weight.numel(), torch.get_num_threads())

    def serves(self, weight: torch.Tensor, kind: str, block: int, *, check: bool = False) -> bool:
        """Whether this screen was made from `weight` as it is now: the same storage (the screen keeps
        it, so no other tensor takes its place), not changed in place by torch's count of its in-place
        changes, and with `check`, not by its values' digest either (changes through `.data`, which the
        count does not see: checked once per generation)."""
        if self.key != _key(weight, kind, block):
            return False
        return not check or self.weight_digest(weight) == self.digest

    def worth_it(self) -> bool:
        """Whether the screen is faster than the full head here, at this thread count (timed once)."""
        if FORCE is not None:
            return FORCE
        threads = torch.get_num_threads()
        if threads not in self.pays:
            self.pays[threads] = self._timed() <= PAYS
        return self.pays[threads]

    def _timed(self) -> float:
        """The screen's time over the full head's (medians of three, in turns), on one row of ones."""
        x = torch.ones(1, self.weight.shape[1], dtype=self.weight.dtype)
        full, screen = [], []
        for _ in range(4):
            start = time.perf_counter()
            call(self.fn, self.kind, x, [self.weight], [None], self.block)
            middle = time.perf_counter()
            self._screen(x)
            full.append(middle - start)
            screen.append(time.perf_counter() - middle)
        full, screen = sorted(full[1:]), sorted(screen[1:])  # the first of each warms up
        return screen[1] / full[1]

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This thread's (scores (N,) float32, candidate blocks (MAX_BLOCKS,) int32, their rows gathered)."""
        work = self._work
        if not hasattr(work, "scores"):
            n, k = self.q.shape
            work.scores = torch.empty(n, dtype=torch.float32)
            work.blocks = torch.empty(MAX_BLOCKS, dtype=torch.int32)
            work.gathered = torch.empty(MAX_BLOCKS * BLOCK, k, dtype=torch.bfloat16)
        return work.scores, work.blocks, work.gathered

    def _screen(self, x: torch.Tensor, banned: torch.Tensor | None = None) -> int:
        """The screen for x (1, K), `banned` ids (int64) excluded: the candidates' blocks of rows gathered
        (`_buffers`), their count of rows returned (< 0: undecided; see `stablelm_q8_screen`)."""
        n, k = self.q.shape
        scores, blocks, gathered = self._buffers()
        return self.lib.stablelm_q8_screen(
            x.data_ptr(), k, self.q.data_ptr(), self.scale.data_ptr(), self.bound.data_ptr(), n, self.tiny,
            self.tiny_per_x, self.nx_max, None if banned is None else banned.data_ptr(),
            0 if banned is None else len(banned), self.weight.data_ptr(), scores.data_ptr(), blocks.data_ptr(),
            MAX_BLOCKS, gathered.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def choose(self, x: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor | None:
        """The greedy token (1,) after x (1, K), the ids in `banned` excluded (as a processor's -inf
        excludes them); None where the screen cannot decide (then compute the logits)."""
        if x.shape != (1, self.q.shape[1]) or x.dtype != torch.bfloat16 or not x.is_contiguous():
            return None
        if banned is not None and (banned.dtype != torch.int64 or not banned.is_contiguous()):
            banned = banned.long().contiguous()
        rows = self._screen(x, banned)
        if rows <= 0:
            return None
        # the candidates' logits: the head's kernel over their blocks, as it computes them in the whole head
        scores, blocks, gathered = self._buffers()
        exact = call(self.fn, self.kind, x, [gathered[:rows]], [None], self.block)
        token = self.lib.stablelm_q8_screen_best(exact.data_ptr(), rows, blocks.data_ptr(), scores.data_ptr())
        return None if token < 0 else torch.tensor([token])


def _key(weight: torch.Tensor, kind: str, block: int) -> tuple:
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, kind, block)


def screen_for(holder: dict, weight: torch.Tensor, kind: str, block: int) -> GreedyHead | None:
    """The screen of `weight` kept in `holder["screen"]` (made when missing or when the weight changed;
    its values checked against the screen's digest at the first step after `holder["checked"]` is
    cleared, once per generation), or None where it does not serve: not bfloat16 on the CPU, too small to
    gain, no quantized kernels, a weight not finite, or slower than the full head here."""
    if FORCE is False or weight.dtype != torch.bfloat16 or not weight.is_cpu or weight.dim() != 2:
        return None
    if FORCE is None and weight.numel() * weight.element_size() < MIN_HEAD_BYTES:
        return None
    with _BUILD:
        screen = holder.get("screen")
        check = not holder.get("checked")
        holder["checked"] = True
        if screen is None or not screen.serves(weight, kind, block, check=check):
            holder["screen"] = screen = None  # the old copy goes first: never two at once
            if holder.get("refused") == _key(weight, kind, block):
                return None
            if quant_library() is None or kernel(kind) is None:
                return None
            try:
                screen = holder["screen"] = GreedyHead(weight, kind, block)
            except ValueError:  # a weight not finite: not tried again for this weight
                holder["refused"] = _key(weight, kind, block)
                return None
    return screen if screen.worth_it() else None
