"""Loading a stablelm-3b-4e1t-shaped bf16 checkpoint (~5.6 GB): this package against the reference.

Writes a random-weight checkpoint once (one model.safetensors, as the hub ships it), then loads it with
`stablelm` and with `transformers`, each in a fresh process, one at a time, onto the CPU in bf16 (or in
--dtype: float32 makes every tensor a conversion, the copying path). Each child reports the wall time of `from_pretrained`, the time to then touch every page of the weights (a
loader that leaves the weights memory-mapped pays its reads there), and its peak RSS (VmHWM). "cold" runs
first evict the checkpoint from the page cache (posix_fadvise), so the reads come from disk; "warm" runs
read it from the page cache. A checksum of the loaded weights must agree between the two.

Run: python benchmarks/load.py [--folder DIR] [--keep] [--repeats 1] [--cache cold warm] [--dtype bfloat16]
(the checkpoint goes to a temporary folder beside the repository, removed afterwards unless --keep; a
--folder without config.json is written and kept). Needs ~6 GB of disk, and RAM for one loaded model.
Then each child generates 16 tokens after a 128-token prompt (the documentation's path: whatever is
prepared for inference shows in the peak RSS after it).
Targets: peak RSS <= 1.15 x the loaded weights' size, loading and generating, and load time <= the
reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent.parent.parent  # the folder holding the repository


def write_checkpoint(folder: Path) -> int:
    """A random bf16 StableLmForCausalLM with stablelm-3b-4e1t's shape in `folder`; returns the weight bytes."""
    from stablelm import StableLmConfig, StableLmForCausalLM

    config = StableLmConfig(torch_dtype="bfloat16")  # the defaults are stablelm-3b-4e1t
    with torch.device("meta"):
        model = StableLmForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(folder, max_shard_size="20GB")
    return sum(p.nbytes for p in model.parameters())


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (clean pages only; save_pretrained fsyncs)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(impl: str, folder: Path, dtype: torch.dtype) -> dict:
    """Runs in a fresh process: import, load, touch every page, report."""
    if impl == "stablelm":
        from stablelm import StableLmForCausalLM
    else:
        import transformers
        from transformers import StableLmForCausalLM

        transformers.logging.set_verbosity_error()
    rss_imported = _peak_rss()
    start = time.perf_counter()
    model = StableLmForCausalLM.from_pretrained(folder, dtype=dtype)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    checksum = 0.0
    with torch.no_grad():
        for param in model.parameters():  # one byte per 4 KiB page faults in all of it
            checksum += param.detach().reshape(-1).view(torch.uint8)[::4096].sum(dtype=torch.float64).item()
    touch_s = time.perf_counter() - start
    assert {p.dtype for p in model.parameters()} == {dtype}
    loaded = sum(p.nbytes for p in model.parameters())
    peak_loaded = _peak_rss()
    # then the first generation, as the documentation's snippet does: whatever a fast path prepares
    # for inference (stablelm: nothing; the kernels read the weights as they are) shows here
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    generate_s = time.perf_counter() - start
    return {"load_s": load_s, "touch_s": touch_s, "peak_rss": peak_loaded, "rss_imported": rss_imported, "loaded": loaded,
            "checksum": checksum, "generate_s": generate_s, "peak_rss_generate": _peak_rss()}  # fmt: skip


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_child(impl: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, "--folder", str(folder), "--dtype", dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="checkpoint folder (written if it holds no config.json)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the checkpoint written in a temporary folder"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument(
        "--dtype", default="bfloat16", help="dtype to load into (float32 converts every tensor)"
    )
    parser.add_argument("--child", choices=["stablelm", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, getattr(torch, args.dtype))))
        return

    folder = args.folder or Path(tempfile.mkdtemp(prefix="stablelm-load-bench-", dir=WORK))
    written = not (folder / "config.json").is_file()
    try:
        if written:
            start = time.perf_counter()
            write_checkpoint(folder)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows = []
        for cache in args.cache:
            for repeat in range(args.repeats):
                # Alternate who goes first: the first process after a change of cache state pays for it.
                for impl in ("stablelm", "transformers")[:: 1 if repeat % 2 == 0 else -1]:
                    if cache == "cold":
                        evict(folder)
                    else:
                        for path in folder.glob("*.safetensors"):  # read once so the run starts warm
                            with open(path, "rb") as f:
                                while f.read(1 << 26):
                                    pass
                    rows.append({"impl": impl, "cache": cache, **run_child(impl, folder, args.dtype)})
        report(rows, weights, args.dtype)
    finally:
        if written and not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


def report(rows: list[dict], weights: int, dtype: str) -> None:
    if len({round(row["checksum"], 3) for row in rows}) != 1:
        raise SystemExit(f"The loaded weights differ between runs: {[row['checksum'] for row in rows]}")
    loaded = rows[0]["loaded"]
    print(f"checkpoint: {weights / 1e9:.2f} GB of bf16 weights (stablelm-3b-4e1t shape), loaded as {dtype} "
          f"({loaded / 1e9:.2f} GB) on the CPU; torch {torch.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    print(
        "| loader | page cache | from_pretrained s | + touch s | file GB/s | peak RSS GB | peak RSS / loaded "
        "| first generate s | peak RSS after it GB | / loaded |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        total = row["load_s"] + row["touch_s"]
        print(f"| {row['impl']} | {row['cache']} | {row['load_s']:.2f} | {total:.2f} | {weights / total / 1e9:.2f} "
              f"| {row['peak_rss'] / 1e9:.2f} | {row['peak_rss'] / loaded:.2f} | {row['generate_s']:.1f} "
              f"| {row['peak_rss_generate'] / 1e9:.2f} | {row['peak_rss_generate'] / loaded:.2f} |")  # fmt: skip
    for cache in dict.fromkeys(row["cache"] for row in rows):
        best = {
            impl: min(r["load_s"] + r["touch_s"] for r in rows if r["cache"] == cache and r["impl"] == impl)
            for impl in ("stablelm", "transformers")
        }
        print(
            f"{cache}: best load+touch, stablelm / transformers = {best['stablelm'] / best['transformers']:.2f}"
        )


if __name__ == "__main__":
    main()
