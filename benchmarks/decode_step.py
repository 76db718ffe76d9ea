"""The decode step's cost on the documented path (`from_pretrained(dtype=torch.bfloat16)` then greedy
`generate`), per token: wall time and the main thread's CPU time (`time.thread_time()`, what one
thread costs, steady on a shared machine where wall time is not), the planned step (`stablelm.lean_step`)
and the modules' step alternating in one process; greedy tokens must be the same.

Run it from two checkouts in turns to compare versions (each prints its own path):
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/decode_step.py --folder DIR [--threads 1] [--rounds 5]
(`DIR`: a checkpoint, e.g. written by `benchmarks/documented_path.py --folder DIR`.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stablelm  # noqa: E402
from stablelm.decode import DecodeStep  # noqa: E402


class _Clock:
    """A streamer recording (wall, CPU) at each put: the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append((time.perf_counter(), time.thread_time()))

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="a checkpoint folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = stablelm.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
    new = args.new_tokens
    step = DecodeStep.for_model(model, compile=False)

    def run(planned: bool) -> tuple[float, float, list[int]]:
        step.lean = planned
        clock = _Clock()
        out = model.generate(
            input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock
        )
        first, last = clock.times[1], clock.times[-1]
        return (last[0] - first[0]) / (new - 1) * 1e3, (last[1] - first[1]) / (new - 1) * 1e3, out[0].tolist()

    run(True), run(False)  # warm-up: kernel builds and plans, page faults
    results: dict[bool, list[tuple[float, float, list[int]]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for planned in (False, True):
            results[planned].append(run(planned))
    same = len({tuple(r[2]) for rs in results.values() for r in rs}) == 1
    print(
        f"{stablelm.__file__}: {args.threads} thread(s), load {os.getloadavg()[0]:.1f}, same tokens: {same}"
    )
    for what, i in (("wall", 0), ("cpu", 1)):
        mod, plan = (sorted(r[i] for r in results[p]) for p in (False, True))
        median = len(mod) // 2
        print(
            f"  {what:>4} ms/token  modules best {mod[0]:.2f} median {mod[median]:.2f}   planned best "
            f"{plan[0]:.2f} median {plan[median]:.2f}   modules/planned {mod[0] / plan[0]:.3f}"
        )
    if not same:
        sys.exit("the planned step's tokens differ from the modules'")


if __name__ == "__main__":
    main()
