"""Time generation on random weights of a real model's shape (the benchmark of python -m stablelm.bench).

Every argument goes to the benchmark: 'stablelm bench --help' lists them.
"""

from __future__ import annotations

import argparse

from .. import bench

PASSTHROUGH = True  # arguments this parser does not define (--help included) go to the benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # the benchmark parses its own arguments


def run(args: argparse.Namespace) -> int:
    bench.main(args.passthrough)
    return 0
