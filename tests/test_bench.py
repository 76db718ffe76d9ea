"""The benchmark entry point runs end to end on a tiny shape (its numbers are not asserted: timings are
benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from stablelm import bench

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest


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


def test_the_quantized_side_by_side_benchmark_runs_and_refuses_bad_arguments(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _tiny_checkpoint(tmp_path / "tiny")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "quant_vs_llama.py"
    args = [
        sys.executable,
        str(script),
        "--folder",
        str(tmp_path / "tiny"),
        "--prompt",
        "8",
        "--new-tokens",
        "4",
    ]
    out = subprocess.run(
        [*args, "--rounds", "1", "--modules", "--int4-modes", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for row in ("bf16", "int8", "int4", "int8 modules", "int4 modules", "int4 mode 0"):
        assert f"\n  {row} " in out.stdout, out.stdout
    for bad, message in (
        (["--rounds", "0"], "--rounds, --threads and --prompt must be at least 1"),
        (
            ["--llama-bench", "x", "--gguf", "q8_0"],
            "--gguf takes NAME=FILE pairs of existing files; got 'q8_0'",
        ),
        (["--gguf", f"q8_0={script}"], "--gguf needs --llama-bench"),
        (["--int4-modes", "1,x"], "--int4-modes takes kernel modes 0-3"),
        (["--int4-modes", "4"], "--int4-modes takes kernel modes 0-3"),
        (["--llama-args", "--repack '0"], "--llama-args one quoted string"),
        (["--page-cache", "cold"], "--page-cache: invalid choice: 'cold'"),
    ):
        refused = subprocess.run([*args, *bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_the_step_variants_benchmark_runs_a_kernel_source_against_itself(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _tiny_checkpoint(tmp_path / "tiny")
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "step_variants.py"
    args = [sys.executable, str(script), "--folder", str(tmp_path / "tiny"), "--prompt", "8", "--turns", "1"]
    source = root / "stablelm" / "kernels" / "linear.c"
    out = subprocess.run([*args, "--linear", str(source)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "B/A median" in out.stdout and out.stdout.count("median") == 3, out.stdout
    refused = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "give --linear and/or --attention" in refused.stderr
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    refused = subprocess.run([*args, "--linear", str(broken)], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "the variant does not build or load" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_prefill_kernel_benchmark_times_sources_in_turns_and_refuses_other_bits(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stablelm import kernels

    if kernels.best_isa() is None:
        pytest.skip("stablelm's kernels have no instruction-set level for this CPU")
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "prefill_kernel.py"
    source = root / "stablelm" / "kernels" / "linear.c"
    args = [sys.executable, str(script), "--shape", "tiny", "--rows", "13", "--turns", "1"]
    out = subprocess.run([*args, str(source), str(source)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("GFLOP/s") == 2 and "1.00x the first" in out.stdout, out.stdout
    # decoding's one row over two sets of the layers
    one = subprocess.run(
        [*args[:5], "1", "--turns", "1", "--copies", "2", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0 and "(2 set(s)" in one.stdout and "at 1 rows" in one.stdout, (
        one.stdout + one.stderr
    )
    # a source whose rounding differs: refused, naming it, before any timing
    other = tmp_path / "other.c"
    rounding = "return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);"
    assert rounding in source.read_text()
    other.write_text(source.read_text().replace(rounding, "return (uint16_t)((u >> 16) ^ 1u);"))
    refused = subprocess.run([*args, str(source), str(other)], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and f"{other} gives other bits" in refused.stderr, refused.stderr
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    refused = subprocess.run([*args, str(broken)], capture_output=True, text=True, timeout=600)
    assert (
        refused.returncode == 1 and "does not build" in refused.stderr and "Traceback" not in refused.stderr
    )
    for bad in ("--threads", "--copies"):
        refused = subprocess.run([*args, bad, "0"], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and bad in refused.stderr, refused.stderr
    env = {**os.environ, "STABLELM_ISA": "avx9"}
    refused = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 1 and "STABLELM_ISA='avx9'" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_step_parts_benchmark_times_each_part_and_refuses_bad_arguments():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "step_parts.py"
    args = [sys.executable, str(script), "--shape", "tiny", "--fill", "20"]
    out = subprocess.run([*args, "--turns", "1", "--steps", "1"], capture_output=True, text=True, timeout=600)
    if out.returncode == 1:  # no native attention on this CPU: said so, not a traceback
        assert "does not apply here" in out.stderr and "Traceback" not in out.stderr, out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert "whole step" in out.stdout and out.stdout.count("without ") == 6, out.stdout
    for bad, message in (
        (["--turns", "0"], "--turns must be at least 1"),
        (["--fill", "-1"], "--fill must be 0"),
    ):
        refused = subprocess.run([*args, *bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_the_speculative_benchmark_runs_a_given_checkpoint_and_refuses_bad_arguments(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import stablelm

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "speculative.py"
    args = [sys.executable, str(script), "--rounds", "1", "--new-tokens", "8"]
    model = ["--model", str(stablelm.demo_model_path())]
    out = subprocess.run([*args, *model, "--methods", "oracle"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "1 thread(s), greedy" in lines[0] and "every text identical" in lines[0], out.stdout
    for task in ("docstring", "repeated"):  # plain always runs (the baseline), then the methods asked for
        assert [line.split()[1] for line in lines if line.startswith(task)] == ["plain", "oracle"], out.stdout
    for bad, message in (
        (["--model", str(tmp_path)], f"--model {tmp_path}: no config.json there"),
        ([*model, "--threads", "0"], "--threads must be at least 1, not 0"),
        ([*model, "--methods", "beam"], "invalid choice: 'beam'"),
    ):
        refused = subprocess.run([*args, *bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def _tiny_checkpoint(folder) -> None:  # noqa: ANN001
    """A tiny random bf16 checkpoint in `folder`, for the benchmark scripts' runs."""
    import torch

    from stablelm import StableLmConfig, StableLmForCausalLM

    config = StableLmConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    StableLmForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def test_the_quantized_kernel_benchmark_refuses_bad_modes_and_groups():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "quant_kernels.py"
    for bad, message in (
        (["--modes", "1,x"], "--modes takes int4 kernel modes 0-3"),
        (["--modes", "5"], "--modes takes int4 kernel modes 0-3"),
        (["--group", "96"], "--group must be 64, 128 or 256"),
        (["--shape", "320x64", "--group", "256"], "--group must be 64, 128 or 256 and divide"),
    ):
        refused = subprocess.run(
            [sys.executable, str(script), *bad], capture_output=True, text=True, timeout=600
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_the_greedy_screen_benchmark_takes_turns_and_refuses_bad_arguments(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "greedy_screen.py"
    args = [sys.executable, str(script), "--shape", "tiny", "--prompt", "8"]
    out = subprocess.run(
        [*args, "--rounds", "2", "--new-tokens", "4"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n0 ") == 1 and "\n1 " in out.stdout and "median ratio" in out.stdout, out.stdout
    assert "tokens identical: True" in out.stdout and "steps the screen decided:" in out.stdout, out.stdout
    for bad, message in (
        (["--rounds", "0"], "--rounds, --threads and --prompt must be at least 1"),
        (["--new-tokens", "1"], "--new-tokens at least 2"),
        (["--folder", str(tmp_path)], "holds no config.json"),
    ):
        refused = subprocess.run([*args, *bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
