"""torchao's int8 / int4 weight-only linear layers on the CPU, against stablelm's bf16, int8 and int4 ones.

Needs torchao (not a dependency of this package): `pip install --no-deps torchao==0.18.0`. The 3B
shape's layers (K x N), 1 and 8 rows, 1 and 2 threads; each cell is the best of 10 calls after 2 warm-up
calls, in milliseconds. torchao's layers run eagerly and under torch.compile; a configuration torchao
cannot run on the CPU prints its error instead.

Run:  python benchmarks/torchao_cpu.py
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_ms(layer, x: torch.Tensor, calls: int = 10) -> float:  # noqa: ANN001
    for _ in range(2):
        layer(x)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def torchao_layer(weight: torch.Tensor, kind: str) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    layer = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype))
    layer[0].weight.data = weight.clone()
    quantize_(layer, Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=128))
    return layer


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import stablelm.layers
    from stablelm.quantization import QuantizedLinear

    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k, n in ((2560, 6912), (6912, 2560), (2560, 2560)):
            weight = (torch.randn(n, k) * 0.02).bfloat16()
            dense = stablelm.layers.Linear(k, n, bias=False).bfloat16()
            dense.weight.data = weight.clone()
            ours = {
                q: QuantizedLinear.from_dense(weight, None, quant_type=q, group_size=128)
                for q in ("int8", "int4")
            }
            for rows in (1, 8):
                x = torch.randn(rows, k).bfloat16()
                cells = {}
                with torch.no_grad():
                    cells["stablelm bf16"] = best_ms(dense, x)
                    for q, layer in ours.items():
                        cells[f"stablelm {q}"] = best_ms(layer, x)
                    for q in ("int8", "int4"):
                        try:
                            layer = torchao_layer(weight, q)
                            cells[f"torchao {q}"] = best_ms(layer, x)
                            compiled = torch.compile(layer)
                            cells[f"torchao {q} compiled"] = best_ms(compiled, x)
                        except Exception as err:  # noqa: BLE001 - reported, not raised: no CPU path
                            cells[f"torchao {q}"] = f"{type(err).__name__}: {str(err)[:60]}"
                shown = ", ".join(
                    f"{name} {v:.3f}" if isinstance(v, float) else f"{name}: {v}" for name, v in cells.items()
                )
                print(f"{k} x {n}, {rows} rows, {threads} threads: {shown}", flush=True)


if __name__ == "__main__":
    main()
