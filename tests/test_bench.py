"""The benchmark entry point runs end to end on a tiny shape (its numbers are not asserted: timings are
benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from stablelm import bench


def test_bench_runs_and_reports_every_figure(capsys):
    bench.main(["--shape", "tiny", "--dtype", "float32", "--prompt", "8", "--new-tokens", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    for key in (
        "prefill_tok_s",
        "decode_tok_s",
        "decode_weight_gb_s",
        "warmup_s",
        "weights_gb",
        "peak_rss_gb",
    ):
        assert result[key] > 0, key
    assert result["impl"] == "stablelm optimized"
    assert result["weights_gb"] * 1e9 == bench.weight_bytes(
        bench.random_model("tiny", bench.DTYPES["float32"])
    )


def test_random_models_are_reproducible():
    a = bench.random_model("tiny", bench.DTYPES["bfloat16"], seed=3)
    b = bench.random_model("tiny", bench.DTYPES["bfloat16"], seed=3)
    assert a.lm_head.weight.dtype.is_floating_point and all(
        (x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_bench_runs_with_the_fp32_cache_and_refuses_it_where_it_cannot_apply(capsys):
    bench.main(["--shape", "tiny", "--prompt", "8", "--new-tokens", "4", "--fp32-cache", "--json"])
    assert json.loads(capsys.readouterr().out)["impl"] == "stablelm optimized fp32-cache"
    for extra in (["--dtype", "float32"], ["--no-optimize"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--shape", "tiny", "--fp32-cache", *extra])
        assert exit_info.value.code == 2
        assert "--fp32-cache is for a bfloat16/float16 model" in capsys.readouterr().err


def test_the_side_by_side_benchmark_takes_turns_and_reports_every_row():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "generate.py"
    args = [sys.executable, str(script), "--shape", "tiny", "--prompt", "8", "--new-tokens", "4"]
    out = subprocess.run([*args, "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for row in ("transformers", "stablelm plain", "stablelm optimized", "stablelm optimized + fp32 cache"):
        assert row in out.stdout
    assert "best of 1 turns each" in out.stdout
    refused = subprocess.run([*args, "--rounds", "0"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--rounds must be at least 1" in refused.stderr
