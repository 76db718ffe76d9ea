"""Decode speed of `stablelm generate` by thread count, on an idle machine and beside one busy process.

OpenMP threads meet at a barrier after every parallel loop; when another process keeps a core busy, a
descheduled thread holds the others up and decoding can collapse (2 threads on 2 cores beside one busy
process: 3.9 tokens/s where 1 thread gave 46). This script runs the command's own decoding
(`python -m stablelm generate -v --seed 1 -n N PROMPT --threads T`, one process per run, so that each
gets a fresh OpenMP runtime and its own start-up choice of "auto") for each thread setting, first with
the machine as it is ("idle") and then beside a competitor it starts (`python -c 'while True: pass'`)
and kills. Settings and loads take turns for --rounds rounds, so that drift in the machine's speed
(other work on a shared machine) reaches all of them alike; each cell is the median decode tokens/s of
its rounds, with the best and the threads the run used ("auto" picks at start-up).

A setting is a thread count or "auto", optionally with environment variables after a colon, e.g.
"2:OMP_WAIT_POLICY=PASSIVE" or "2:GOMP_SPINCOUNT=300000" (libgomp's default; the command sets
GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is set).

Run:  python benchmarks/threads.py --model /path/to/checkpoint --new-tokens 128 --rounds 3
      python benchmarks/threads.py --new-tokens 16 --rounds 1          # the bundled demo model, quick
      python benchmarks/threads.py --settings 1 2 auto 2:OMP_WAIT_POLICY=PASSIVE 2:GOMP_SPINCOUNT=300000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

DECODE = re.compile(r"generated: (\d+) tokens, decode ([\d.]+) tokens/s")
THREADS = re.compile(r"^threads: (\d+)", re.M)
LOADS = ("idle", "busy")


@dataclass
class Setting:
    """A thread setting ("1", "auto", ...) and the environment it runs with."""

    label: str
    threads: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Setting:
        threads, _, env_text = text.partition(":")
        env = {}
        for item in filter(None, env_text.split(",")):
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise argparse.ArgumentTypeError(f"expected NAME=VALUE after ':', got {item!r} in {text!r}")
            env[name] = value
        if threads != "auto" and not (threads.isdigit() and int(threads) > 0):
            raise argparse.ArgumentTypeError(f"expected a thread count or 'auto', got {threads!r}")
        return cls(text, threads, env)


@dataclass
class Run:
    tok_s: float
    threads: int


def decode_once(args: argparse.Namespace, setting: Setting) -> Run:
    """One `stablelm generate` process; its decode tokens/s and thread count, from its -v report."""
    command = [sys.executable, "-m", "stablelm", "generate", "-v", "--seed", "1", "-n", str(args.new_tokens)]
    if args.model:
        command += ["-m", args.model]
    command += ["--threads", setting.threads, args.prompt]
    env = {**os.environ, **setting.env, "HF_HUB_OFFLINE": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "STABLELM_THREADS"):  # --threads decides
        if name not in setting.env:
            env.pop(name, None)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    decode, threads = DECODE.search(out.stderr), THREADS.search(out.stderr)
    if out.returncode != 0 or decode is None or threads is None:
        raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr.strip()}")
    return Run(float(decode[2]), int(threads[1]))


def competitor() -> subprocess.Popen:
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(args: argparse.Namespace) -> dict[tuple[str, str], list[Run]]:
    runs: dict[tuple[str, str], list[Run]] = {(s.label, load): [] for s in args.settings for load in LOADS}
    for round_number in range(args.rounds):
        for load in LOADS:
            busy = competitor() if load == "busy" else None
            try:
                if busy is not None:
                    time.sleep(0.5)  # let it be running before the next process looks at the load
                settings = args.settings if round_number % 2 == 0 else args.settings[::-1]
                for setting in settings:
                    run = decode_once(args, setting)
                    runs[(setting.label, load)].append(run)
                    print(
                        f"round {round_number + 1}, {load}, --threads {setting.label}: "
                        f"{run.tok_s:.1f} tokens/s on {run.threads} threads",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    return runs


def table(args: argparse.Namespace, runs: dict[tuple[str, str], list[Run]]) -> str:
    def cell(found: list[Run]) -> str:
        rates = [run.tok_s for run in found]
        used = sorted({run.threads for run in found})
        return f"{statistics.median(rates):7.1f} (best {max(rates):6.1f}) on {'/'.join(map(str, used))}"

    width = max(len("--threads"), *(len(s.label) for s in args.settings))
    lines = [
        f"decode tokens/s of `stablelm generate -n {args.new_tokens}` on {args.model or 'the demo model'}, "
        f"{os.cpu_count()} CPUs, median of {args.rounds} round(s) (best), threads used",
        f"{'--threads':<{width}}  {'idle':<32}  {'beside one busy process':<32}",
    ]
    for setting in args.settings:
        lines.append(
            f"{setting.label:<{width}}  {cell(runs[(setting.label, 'idle')]):<32}  "
            f"{cell(runs[(setting.label, 'busy')]):<32}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint folder (default: the bundled demo model)")
    parser.add_argument(
        "--settings",
        nargs="+",
        type=Setting.parse,
        default=[Setting.parse(s) for s in ("1", "2", "auto")],
        metavar="T[:NAME=VALUE,...]",
        help="thread settings to compare (default: 1 2 auto)",
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per run (default: 128)")
    parser.add_argument("--prompt", default="The for statement", help="the prompt")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every setting and load (default: 3)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = parser.parse_args(argv)
    print(table(args, measure(args)))


if __name__ == "__main__":
    main()
