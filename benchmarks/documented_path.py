"""The documentation's path, timed: `from_pretrained(path, dtype=torch.bfloat16)` then
`generate(input_ids=..., max_new_tokens=48, min_new_tokens=48, do_sample=False)`, this package against
the reference (transformers) in one process, taking turns, on a random-weight checkpoint written by the
reference's `save_pretrained`; and, when a llama.cpp build is given, `llama-bench` on the same weights
converted to GGUF, in the same turns.

Nothing is called besides what the documentation shows: no `optimize_for_inference`, no options. Each
turn runs every implementation once; each figure is the best of its turns (this machine's speed drifts
from minute to minute; taking turns exposes all of them to the same drift), and "x ref" divides by the
reference's best. Prefill is the time to the first new token (tokens/s of prompt), decode the rest.
Greedy tokens must equal the reference's: the script fails otherwise.

The page cache's state changes decoding speed (1.13x on the 160M shape, 1.04-1.07x on the 3B one, a
2-core Zen 4, in turns in one process): a file just
written (by `save_pretrained`, a download, a converter) is cached in 4 KB pages and mapped so, a file read
back from disk in 2 MB ones (docs/speed.md, "Weights in huge pages"). By default (`--page-cache reread`)
the checkpoint and the GGUF are both dropped from the cache and read back first, so that both
implementations map their weights in the same state; `--page-cache as-is` leaves them as they are.

Run:
    python benchmarks/documented_path.py --shape 160m [--threads 1] [--rounds 3] [--folder DIR]
    python benchmarks/documented_path.py --shape 3b --llama-bench /path/to/llama-bench \\
        --convert /path/to/llama.cpp/convert_hf_to_gguf.py --convert-python /path/to/python
(`--gguf FILE` instead of `--convert` reuses a converted file. The checkpoint goes to --folder, kept
between runs, else to a temporary folder beside the repository, removed afterwards. The 3B shape needs
~6 GB of disk and ~12 GB of memory for both models.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablelm.bench import SHAPES, _Clock  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "gpt-neox-20b"  # llama.cpp's converter wants one


def write_checkpoint(folder: Path, shape: str) -> None:
    """Random bf16 weights of `shape`, written by the reference's save_pretrained (once per folder)."""
    if (folder / "config.json").is_file():
        return
    import transformers

    from stablelm import StableLmConfig

    config = transformers.StableLmConfig.from_dict(StableLmConfig(**SHAPES[shape]).to_dict())
    config.torch_dtype = "bfloat16"
    with torch.device("meta"):
        model = transformers.StableLmForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)


def reread(paths: list[Path]) -> None:
    """Drop each file's cached pages (those no process maps) and read it back in order, as after a cold
    start: the kernel's readahead then caches it in large folios, which mappings map in 2 MB pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 16 << 20):
                pass
        finally:
            os.close(fd)


def timed(generate, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:  # noqa: ANN001
    """Prefill and decode tokens/s of one generation, and its tokens."""
    clock = _Clock()
    start = time.perf_counter()
    out = generate(ids, clock)
    end = time.perf_counter()
    first = clock.times[1]
    batch, prompt = ids.shape
    new = out.shape[1] - prompt
    return batch * prompt / (first - start), batch * (new - 1) / (end - first), out


def llama_bench(
    binary: str, gguf: Path, threads: int, prompt: int, new: int, extra: tuple[str, ...] = ()
) -> tuple[float, float]:
    """llama-bench's prefill (pp, from an empty context) and decode (tg) tokens/s, one repetition. The
    decode is timed after a context of `prompt` tokens (`-d`, llama-bench's depth), as ours decodes after
    the prompt: its default tg starts from an empty context, where attention reads no past keys. `extra`:
    more llama-bench arguments (e.g. `--repack 0` where its AMX repacking dies on a VM)."""
    base = [binary, "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *extra]
    pp = _llama_rate(base + ["-p", str(prompt), "-n", "0"])
    tg = _llama_rate(base + ["-p", "0", "-n", str(new), "-d", str(prompt)])
    return pp, tg


def _llama_rate(cmd: list[str]) -> float:
    """The tokens/s of the one test a llama-bench command runs."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({result.returncode}): {result.stderr[-2000:]}")
    (row,) = json.loads(result.stdout)
    return row["avg_ts"]


def convert(folder: Path, script: str, python: str) -> Path:
    gguf = folder / "model-bf16.gguf"
    if not gguf.is_file():
        cmd = [python, script, str(folder), "--outtype", "bf16", "--outfile", str(gguf)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    return gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["160m", "3b", "1.6b"], default="160m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--folder", type=Path, help="checkpoint folder (written once, kept)")
    parser.add_argument("--llama-bench", help="a llama-bench binary, run in the same turns")
    parser.add_argument("--gguf", type=Path, help="the same weights as a bf16 GGUF file")
    parser.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py, to make the GGUF")
    parser.add_argument("--convert-python", default=sys.executable, help="a Python with llama.cpp's gguf")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument(
        "--page-cache",
        choices=["reread", "as-is"],
        default="reread",
        help="drop the weight files from the page cache and read them back first (default), or not",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    if args.llama_bench and not (args.gguf or args.convert):
        parser.error("--llama-bench needs --gguf FILE or --convert convert_hf_to_gguf.py")
    torch.set_num_threads(args.threads)
    temporary = None
    folder = args.folder
    if folder is None:
        temporary = tempfile.mkdtemp(prefix="stablelm-bench-", dir=ROOT.parent)
        folder = Path(temporary)
    try:
        run(args, folder)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def run(args: argparse.Namespace, folder: Path) -> None:
    import transformers

    import stablelm
    from stablelm import kernels

    transformers.logging.set_verbosity_error()
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, args.shape)
    gguf = args.gguf or (convert(folder, args.convert, args.convert_python) if args.llama_bench else None)
    if args.page_cache == "reread":
        reread([*sorted(folder.glob("*.safetensors")), *([gguf] if gguf else [])])
    # The documentation's code, as its users write it
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ours = stablelm.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    new = args.new_tokens

    def reference(input_ids, streamer):  # noqa: ANN001, ANN202
        return ref.generate(
            input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer
        )

    def stablelm_(input_ids, streamer):  # noqa: ANN001, ANN202
        return ours.generate(
            input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer
        )

    impls = {"transformers": reference, "stablelm": stablelm_}
    for generate in impls.values():  # warm-up: first-call costs (kernel builds, page faults)
        generate(ids[:, :16], None)
    best: dict[str, list[float]] = {name: [0.0, 0.0] for name in [*impls, *(["llama.cpp"] if gguf else [])]}
    tokens = {}
    for _ in range(args.rounds):
        for name, generate in impls.items():
            prefill, decode, out = timed(generate, ids)
            best[name] = [max(best[name][0], prefill), max(best[name][1], decode)]
            tokens[name] = out
        if gguf:
            pp, tg = llama_bench(args.llama_bench, gguf, args.threads, args.prompt, new)
            best["llama.cpp"] = [max(best["llama.cpp"][0], pp), max(best["llama.cpp"][1], tg)]
    same = torch.equal(tokens["stablelm"], tokens["transformers"])
    flags = kernels.cpu_flags()
    cpu = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    cpu += " + AMX" if "amx_bf16" in flags else ""
    print(
        f"\n{args.shape} bf16, batch {args.batch}, prompt {args.prompt}, {new} new tokens, "
        f"{args.threads} thread(s), best of {args.rounds} turns; CPU {cpu}, stablelm kernels "
        f"{kernels.selected_isa()}; page cache {args.page_cache}"
    )
    print(
        f"{'implementation':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'x ref (decode)':>16}{'x ref (prefill)':>17}"
    )
    ref_pp, ref_tg = best["transformers"]
    for name, (pp, tg) in best.items():
        print(f"{name:<16}{pp:>15.1f}{tg:>14.2f}{tg / ref_tg:>16.2f}{pp / ref_pp:>17.2f}")
    print(f"greedy tokens identical to the reference's: {same}")
    if args.json:
        print(json.dumps({"shape": args.shape, "threads": args.threads, "best": best, "same_tokens": same}))
    if not same:
        sys.exit("stablelm's greedy tokens differ from the reference's")


if __name__ == "__main__":
    main()
