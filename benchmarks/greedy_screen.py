"""Greedy decoding with and without the LM head's int8 screen (`stablelm.greedy_head`), in turns in one
process, on one model: the documentation's path (`generate(input_ids=..., max_new_tokens=N,
min_new_tokens=N, do_sample=False)`), the screen forced on and off by turns (the order swapped each
round), tokens checked identical.

Prints each round's decode tokens/s both ways and their ratio, the median ratio, how many steps the
screen decided, and whether the screen's own timing would use it here by default. Random weights of a
shape (`stablelm.bench.SHAPES`), or a checkpoint with --folder.

Run:  python benchmarks/greedy_screen.py [--shape 160m] [--threads 1] [--rounds 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from documented_path import timed  # noqa: E402

import stablelm  # noqa: E402
from stablelm import greedy_head  # noqa: E402
from stablelm.bench import SHAPES, random_model  # noqa: E402
from stablelm.decode import DecodeStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="160m")
    parser.add_argument("--folder", type=Path, help="a bf16 checkpoint instead of random weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.prompt < 1 or args.new_tokens < 2:
        parser.error("--rounds, --threads and --prompt must be at least 1, --new-tokens at least 2")
    if args.folder is not None and not (args.folder / "config.json").is_file():
        parser.error(f"--folder {args.folder} holds no config.json: pass a checkpoint folder")
    torch.set_num_threads(args.threads)
    if args.folder is not None:
        model = stablelm.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)
    else:
        model = random_model(args.shape, torch.bfloat16)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    new = args.new_tokens

    def generate(input_ids, streamer):  # noqa: ANN001, ANN202
        return model.generate(
            input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer
        )

    decided = []
    choose = greedy_head.GreedyHead.choose

    def counting(self, x, banned):  # noqa: ANN001, ANN202
        token = choose(self, x, banned)
        decided.append(token is not None)
        return token

    greedy_head.GreedyHead.choose = counting
    rates: dict[bool, list[float]] = {False: [], True: []}
    tokens = {}
    try:
        for screen in (False, True):  # warm-up: kernels, plans, the screen's copy
            greedy_head.FORCE = screen
            generate(ids[:, :16], None)
        decided.clear()
        for turn in range(args.rounds):
            for screen in (False, True) if turn % 2 == 0 else (True, False):
                greedy_head.FORCE = screen
                _, decode, out = timed(generate, ids)
                rates[screen].append(decode)
                tokens[screen] = out
        greedy_head.FORCE = None
        holder = DecodeStep.for_model(model, compile=False)._screen.get("screen")
        by_default = holder is not None and holder.worth_it()
    finally:
        greedy_head.FORCE = None
        greedy_head.GreedyHead.choose = choose
    where = args.folder or f"random {args.shape} weights"
    print(
        f"\n{where}, bf16, prompt {args.prompt}, {new} new tokens, {args.threads} thread(s), {args.rounds} rounds"
    )
    print(f"{'round':<8}{'full head tok/s':>17}{'screen tok/s':>15}{'ratio':>8}")
    ratios = []
    for turn, (off, on) in enumerate(zip(rates[False], rates[True], strict=True)):
        ratios.append(on / off)
        print(f"{turn:<8}{off:>17.2f}{on:>15.2f}{on / off:>8.3f}")
    print(f"median ratio {statistics.median(ratios):.3f}")
    print(
        f"steps the screen decided: {sum(decided)} of {len(decided)} it was asked"
        + ("" if decided else " (no native kernel serves this head here: the screen does not apply)")
    )
    print(f"used by default here (its own timing): {'yes' if by_default else 'no'}")
    same = torch.equal(tokens[False], tokens[True])
    print(f"tokens identical: {same}")
    if not same:
        sys.exit("the screen changed the greedy tokens")


if __name__ == "__main__":
    main()
