"""Error of the one-row (decoding) quantized kernels on real activations, against a float64 computation
with the dequantized weights: the worktree's `quant.c` and another revision's (`--old`, default 47c4483:
on AVX2 CPUs, float32 sums; the worktree's AVX2 kernels sum integers over x made int16, see quant.c).

The bundled demo model (int8, int4 group 64: every layer quantized) greedily decodes `--tokens` tokens
from the first held-out documents; each quantized layer's one-row input is kept, and every kernel is
run on it. Per kernel: the largest and the mean over calls of max |y - ref| / max |ref| (bfloat16 x and
y: the output's own rounding is ~2^-9 of its size).

Run:  python benchmarks/quant_one_row_error.py [--old REV] [--tokens 32] [--prompts 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="47c4483")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    import demo_corpus
    from quant_decode import build

    import stablelm
    import stablelm.quantization.linear as qlinear
    from stablelm.quantization import QuantizationConfig, QuantizedLinear

    tmp = Path(tempfile.mkdtemp(prefix="quanterr-"))
    old = tmp / "old.c"
    old.write_text(
        subprocess.check_output(
            ["git", "-C", str(ROOT), "show", f"{args.old}:stablelm/kernels/quant.c"], text=True
        )
    )
    libs = {"new": qlinear.quant_library(), "old": build(old, tmp / "old.so")}
    tokenizer = stablelm.AutoTokenizer.from_pretrained(ROOT / "stablelm/assets/demo")
    documents = demo_corpus.split(demo_corpus.build_corpus())[1][: args.prompts]
    for qtype in ("int8", "int4"):
        model = stablelm.AutoModelForCausalLM.from_pretrained(
            ROOT / "stablelm/assets/demo", dtype=torch.bfloat16
        )
        stablelm.quantize(model, QuantizationConfig(qtype, group_size=64))
        inputs: list[tuple[QuantizedLinear, torch.Tensor]] = []
        forward = QuantizedLinear.forward

        def keep(self: QuantizedLinear, x: torch.Tensor, forward=forward, inputs=inputs) -> torch.Tensor:
            if x.reshape(-1, x.shape[-1]).shape[0] == 1:
                inputs.append((self, x.reshape(1, -1).clone()))
            return forward(self, x)

        QuantizedLinear.forward = keep
        try:
            with torch.no_grad():
                for text in documents:
                    ids = torch.tensor([tokenizer(text)["input_ids"][:32]])
                    model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
        finally:
            QuantizedLinear.forward = forward
        for name, lib in libs.items():
            qlinear.quant_library = lambda chosen=lib: chosen
            errors = []
            with torch.no_grad():
                for layer, x in inputs:
                    ref = x.double() @ layer.dequantized().double().t()
                    if layer.bias is not None:
                        ref += layer.bias.double()
                    errors.append(((layer(x).double() - ref).abs().max() / ref.abs().max()).item())
            print(
                f"{qtype} {name}: {len(errors)} calls, max rel. error {max(errors):.2e},"
                f" mean {sum(errors) / len(errors):.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
