"""The kernels' decisions kept on disk (stablelm.kernels.plan_cache): the next process reads them instead of
probing and timing again; a file made under another context (torch, CPU, environment, kernel source) is
never read; damaged files and impossible values are ignored; STABLELM_PLAN_CACHE=0 keeps nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stablelm import kernels as native
from stablelm.kernels import attention, linear, plan_cache, prefetch

needs_kernels = pytest.mark.skipif(
    native.library() is None or native.kernel("bf16_dot") is None, reason="needs stablelm's native kernels"
)
SHAPE = (torch.bfloat16, 256, 96, False, 1)  # dtype, in, out, bias, rows


@pytest.fixture
def kept(monkeypatch, tmp_path):
    """The disk cache turned on, in a folder of the test; every plan made afresh in this process."""
    monkeypatch.setenv(plan_cache.ENV, "1")
    monkeypatch.setattr(plan_cache, "_folder", lambda: tmp_path)
    monkeypatch.setattr(plan_cache, "BUSY_ELSEWHERE", float("inf"))  # kept however busy the machine is
    monkeypatch.setattr(linear, "_PLANS", {})
    monkeypatch.setattr(attention, "_PLANS", {})
    plan_cache.forget()
    yield tmp_path
    plan_cache.forget()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("plans-*.json"))


def _made() -> tuple[str, int]:
    """The plan of SHAPE here (by exactness only: conftest), skipping where no kernel serves it."""
    made = linear.plan(*SHAPE)
    if made is None:
        pytest.skip("no bfloat16 kernel gives torch's bits for this shape on this CPU")
    return made


def _fail(*args, **kwargs):
    raise AssertionError("probed or timed although the answer was kept")


@needs_kernels
def test_a_plan_is_kept_and_read_back_without_probing(kept, monkeypatch):
    made = _made()
    (path,) = _files(kept)
    entries = json.loads(path.read_text())
    assert [made[0], made[1]] in entries.values()
    # the next process: nothing in memory, the probes and the timing unavailable
    monkeypatch.setattr(linear, "_PLANS", {})
    plan_cache.forget()
    monkeypatch.setattr(linear, "_half_plan", _fail)
    monkeypatch.setattr(linear, "_pays", _fail)
    assert linear.plan(*SHAPE) == made


@needs_kernels
def test_the_next_process_reads_the_plans_of_the_first(tmp_path):
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        import torch
        from stablelm.kernels import linear, plan_cache
        plan_cache._folder = lambda: Path({str(tmp_path)!r})
        plan_cache.BUSY_ELSEWHERE = float("inf")  # kept however busy the machine is
        linear.SPEED_CHECK = False  # exactness only, as in this process (conftest)
        calls = []
        probe = linear._half_plan
        linear._half_plan = lambda *a: calls.append(a) or probe(*a)
        print(linear.plan(torch.bfloat16, 256, 96, False, 1), len(calls))
        """
    )
    env = {**os.environ, plan_cache.ENV: "1"}
    first, second = (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    plan, probed = first.stdout.rsplit(maxsplit=1)
    if plan == "None":
        pytest.skip("no bfloat16 kernel gives torch's bits for this shape on this CPU")
    assert probed == "1"
    assert second.stdout == f"{plan} 0\n"  # the same plan, not probed


@needs_kernels
def test_another_context_reads_another_file(kept, monkeypatch):
    made = _made()
    libraries = (native.library()._name,)
    first = plan_cache.context(libraries)
    changes = (
        lambda m: m.setenv("ONEDNN_MAX_CPU_ISA", "AVX2"),
        lambda m: m.setattr(torch, "__version__", "0.0.1"),
        lambda m: m.setattr(plan_cache, "cpu_identity", lambda: "vendor_id=Other"),
    )
    for change in changes:
        with monkeypatch.context() as m:
            plan_cache.forget()
            change(m)
            assert plan_cache.context(libraries) != first
            m.setattr(linear, "_PLANS", {})
            calls = []
            probe = linear._half_plan
            m.setattr(linear, "_half_plan", lambda *a, calls=calls, probe=probe: calls.append(a) or probe(*a))
            assert linear.plan(*SHAPE) == made and len(calls) == 1  # probed again, under its own file
    plan_cache.forget()
    assert plan_cache.context(libraries) == first
    assert plan_cache.context(("another-library.so",)) != first  # another kernel source or flags
    assert len(_files(kept)) == 4


@needs_kernels
@pytest.mark.parametrize(
    "value",
    ["not json {", "[1, 2]", '{"linear": 5}', None],
)
def test_a_damaged_file_is_ignored_and_replaced(kept, monkeypatch, value):
    made = _made()
    (path,) = _files(kept)
    if value is None:  # a valid file whose entry is no possible plan: unknown kind, wrong dtype, odd block
        key = next(iter(json.loads(path.read_text())))
        bad = [["bogus", 512], ["f16_dot", 0], ["bf16_dot", 513], ["bf16_dot", "0"], "bf16_dot", 3]
        for entry in bad:
            path.write_text(json.dumps({key: entry}))
            plan_cache.forget()
            monkeypatch.setattr(linear, "_PLANS", {})
            assert linear.plan(*SHAPE) == made, entry
            assert json.loads(path.read_text())[key] == [made[0], made[1]]  # replaced by the plan made
        return
    path.write_text(value)
    plan_cache.forget()
    monkeypatch.setattr(linear, "_PLANS", {})
    assert linear.plan(*SHAPE) == made
    assert [made[0], made[1]] in json.loads(path.read_text()).values()


@needs_kernels
def test_turned_off_nothing_is_kept(kept, monkeypatch):
    for off in ("0", "off", "false", "No"):
        monkeypatch.setenv(plan_cache.ENV, off)
        monkeypatch.setattr(linear, "_PLANS", {})
        assert linear.plan(*SHAPE) == _made()
        assert _files(kept) == []


@needs_kernels
def test_an_unwritable_folder_keeps_plans_for_the_process_only(monkeypatch, tmp_path):
    monkeypatch.setenv(plan_cache.ENV, "1")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(plan_cache, "_folder", lambda: blocker / "kernels")  # under a file: no folder
    monkeypatch.setattr(linear, "_PLANS", {})
    plan_cache.forget()
    try:
        made = _made()
        assert not (blocker / "kernels").exists()
        monkeypatch.setattr(linear, "_PLANS", {})
        monkeypatch.setattr(linear, "_half_plan", _fail)  # this process still has it
        assert linear.plan(*SHAPE) == made
    finally:
        plan_cache.forget()


@needs_kernels
def test_a_kept_prefetch_mode_is_set_in_the_library(kept, monkeypatch):
    lib = native.library()
    before = lib.stablelm_prefetch(prefetch.PREFETCH["bf16_dot"][0])
    try:
        monkeypatch.setattr(prefetch, "_PREFETCH", {})
        timed = prefetch.prefetch_mode("bf16_dot")
        other = next(mode for mode in prefetch.PREFETCH["bf16_dot"][1] if mode != timed)  # any mode timed
        (path,) = _files(kept)
        entries = json.loads(path.read_text())
        key = next(k for k in entries if k.startswith("prefetch bf16_dot"))
        path.write_text(json.dumps({key: other}))  # as if another run had timed the other mode
        plan_cache.forget()
        monkeypatch.setattr(prefetch, "_PREFETCH", {})
        monkeypatch.setattr(prefetch, "_fastest", _fail)
        assert prefetch.prefetch_mode("bf16_dot") == other
        assert lib.stablelm_prefetch(prefetch.PREFETCH["bf16_dot"][0]) == other
        path.write_text(json.dumps({key: 7}))  # no such mode: timed again
        plan_cache.forget()
        monkeypatch.setattr(prefetch, "_PREFETCH", {})
        with pytest.raises(AssertionError, match="probed or timed"):
            prefetch.prefetch_mode("bf16_dot")
    finally:
        prefetch.set_prefetch("bf16_dot", before)


def test_a_kept_attention_answer_is_read_back(kept, monkeypatch):
    fn = attention.kernel()
    if fn is None or attention.plan(torch.bfloat16, 4, 2, 32, 32**-0.5) is None:
        pytest.skip("no native attention kernel for this CPU and torch")
    monkeypatch.setattr(attention, "_PLANS", {})
    plan_cache.forget()
    monkeypatch.setattr(attention, "_reproduces_torch", _fail)
    assert attention.plan(torch.bfloat16, 4, 2, 32, 32**-0.5) is fn
    (path,) = _files(kept)
    path.write_text(json.dumps(dict.fromkeys(json.loads(path.read_text()), False)))  # kept: it does not
    plan_cache.forget()
    monkeypatch.setattr(attention, "_PLANS", {})
    assert attention.plan(torch.bfloat16, 4, 2, 32, 32**-0.5) is None


@pytest.mark.parametrize(
    ("busy", "written"), [(1.6, False), (0.3, False), (0.2, True), (0.0, True), (None, True)]
)
def test_an_answer_made_while_other_processes_keep_the_cpu_busy_serves_this_process_only(
    monkeypatch, tmp_path, busy, written
):
    """Timings made beside a busy process can pick the slower kernel: such an answer is not kept on disk
    (the next process decides again), and is not written later with another answer either."""
    from stablelm import threads

    monkeypatch.setenv(plan_cache.ENV, "1")
    monkeypatch.setattr(plan_cache, "_folder", lambda: tmp_path)
    monkeypatch.setattr(threads.CpuSample, "busy_elsewhere", lambda self, **kw: busy)
    plan_cache.forget()
    made = []

    def make():
        made.append(1)
        return ["bf16_dot", 0]

    libraries = ("library.so",)
    try:
        assert plan_cache.remembered(libraries, "a layer", lambda v: True, make) == ["bf16_dot", 0]
        assert plan_cache.remembered(libraries, "a layer", lambda v: True, make) == ["bf16_dot", 0]
        assert len(made) == 1  # this process asks once either way
        monkeypatch.setattr(threads.CpuSample, "busy_elsewhere", lambda self, **kw: 0.0)
        plan_cache.remembered(libraries, "another layer", lambda v: True, lambda: None)  # quiet: written
        (path,) = _files(tmp_path)
        assert ("a layer" in json.loads(path.read_text())) is written
        plan_cache.forget()  # the next process
        plan_cache.remembered(libraries, "a layer", lambda v: True, make)
        assert len(made) == (1 if written else 2)
    finally:
        plan_cache.forget()


def test_a_folder_in_the_variable_keeps_the_files_there(monkeypatch, tmp_path):
    """`STABLELM_PLAN_CACHE=<folder>`: the answers go there (the kernels stay beside the cache); on/off
    words keep their meaning."""
    from stablelm import threads

    monkeypatch.setattr(threads.CpuSample, "busy_elsewhere", lambda self, **kw: 0.0)
    folder = tmp_path / "my plans"
    monkeypatch.setenv(plan_cache.ENV, str(folder))
    plan_cache.forget()
    try:
        assert plan_cache.enabled()
        assert plan_cache.remembered(("library.so",), "a layer", lambda v: True, lambda: ["bf16_dot", 0])
        (path,) = _files(folder)
        assert json.loads(path.read_text()) == {"a layer": ["bf16_dot", 0]}
        for word in ("1", "on", "", "0", "off"):
            monkeypatch.setenv(plan_cache.ENV, word)
            assert plan_cache._folder() == native.cache_dir()
    finally:
        plan_cache.forget()
