"""Run transformers' own StableLM test file (tests/models/stablelm/test_modeling_stablelm.py with its tester
mixins) against transformers' classes and against stablelm's, and report which cases pass with each.

    python scripts/run_reference_tests.py --tests-from /path/to/transformers [--work /tmp/stablelm-reftests]

The installed transformers' sdist (downloaded with pip) gives the top-level test modules
(test_modeling_common.py, ...) of exactly the installed version; it lacks tests/models, tests/generation,
tests/causal_lm_tester.py and a few helpers, which come from `--tests-from`: a transformers source checkout,
or its bare git directory (read at `--rev`). Nothing of it is copied into this repository. See
docs/reference-tests.md for the counts and the cases that fail with stablelm, and why.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILE = "tests/models/stablelm/test_modeling_stablelm.py"
# Files the sdist lacks, taken from --tests-from.
FROM_SOURCE = [
    "tests/__init__.py",
    "tests/causal_lm_tester.py",
    "tests/generation/__init__.py",
    "tests/generation/test_utils.py",
    "tests/models/__init__.py",
    "tests/models/stablelm/__init__.py",
    TEST_FILE,
    "tests/utils/__init__.py",
    "tests/utils/test_configuration_utils.py",
    "tests/utils/tiny_model_summary.json",
]
FROM_SOURCE_FOLDERS = ["tests/exporters", "utils/test_module"]
# Written by this script (see CONFTEST): shared defaults of the testers, which newer testing_utils define
# and some versions lack, and the multi-process helpers, which only tests for several accelerators use.
DISTRIBUTED_STUB = """def _unavailable(*args, **kwargs):
    raise RuntimeError("the multi-process test helpers are not part of this harness")


run_distributed = _get_distributed_backend = _get_distributed_device_type = _unavailable
_get_rank_device = _set_rank_device = _start_rank_processes = _unavailable
"""
CONFTEST = """import os
import sys

import transformers.testing_utils as testing_utils

if not hasattr(testing_utils, "_TEXT_MODEL_TESTER_DEFAULTS"):
    testing_utils._TEXT_MODEL_TESTER_DEFAULTS = {
        "batch_size": 13, "seq_length": 7, "is_training": True, "use_input_mask": True, "use_labels": True,
        "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 32, "hidden_act": "gelu", "max_position_embeddings": 512,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "expert_interval": 1,
        "moe_layer_start_index": 0, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 36,
        "shared_expert_gate": True, "moe_num_shared_experts": 2, "num_experts_per_tok": 2, "num_experts": 8,
    }
if os.environ.get("STABLELM_REFERENCE_TESTS") == "ours":
    sys.path.insert(0, os.path.join(os.environ["STABLELM_REPO"], "scripts"))
    import reference_tests_shim

    reference_tests_shim.install()
    reference_tests_shim.patch_tester()
"""


def _read_source(source: Path, rev: str, path: str) -> bytes | None:
    if (source / "tests").is_dir():
        file = source / path
        return file.read_bytes() if file.is_file() else None
    done = subprocess.run(["git", "--git-dir", str(source), "show", f"{rev}:{path}"], capture_output=True)
    return done.stdout if done.returncode == 0 else None


def _list_source(source: Path, rev: str, folder: str) -> list[str]:
    if (source / "tests").is_dir():
        return [str(p.relative_to(source)) for p in (source / folder).rglob("*") if p.is_file()]
    done = subprocess.run(
        ["git", "--git-dir", str(source), "ls-tree", "-r", "--name-only", rev, folder],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def assemble(work: Path, source: Path, rev: str) -> Path:
    """The test tree: the sdist's tests, the files it lacks from `source`, the conftest and stub."""
    version = metadata.version("transformers")
    sdist = work / f"transformers-{version}"
    if not sdist.is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", str(work)],
            check=True,
        )  # fmt: skip
        with tarfile.open(work / f"transformers-{version}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(sdist / "tests", tree / "tests")
    (tree / "src").symlink_to(sdist / "src")  # some tests read the source files
    paths = FROM_SOURCE + [p for folder in FROM_SOURCE_FOLDERS for p in _list_source(source, rev, folder)]
    for path in paths:
        target = tree / path
        if target.exists():
            continue  # the sdist's own version wins
        data = _read_source(source, rev, path)
        if data is None:
            raise SystemExit(f"{path} is not in {source} at {rev}: pass a transformers checkout with tests/.")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    stub = tree / "tests" / "distributed_testing_utils.py"
    if not stub.exists():
        stub.write_text(DISTRIBUTED_STUB)
    (tree / "conftest.py").write_text(CONFTEST)
    return tree


def run(tree: Path, extra: Path, which: str, pytest_args: list[str]) -> dict[str, str]:
    """Outcome per test id ("PASSED", "FAILED", ...), and the log written beside the tree."""
    env = {
        "STABLELM_REFERENCE_TESTS": which,
        "STABLELM_REPO": str(REPO),
        "PYTHONPATH": f"{extra}:{REPO}",
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
    }
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", TEST_FILE, *pytest_args]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    log = tree.parent / f"{which}.log"
    log.write_text(done.stdout + done.stderr)
    outcomes = {}
    for line in done.stdout.splitlines():
        if match := re.match(r"^(PASSED|FAILED|ERROR) \S+::(\S+)", line):
            outcomes.setdefault(match.group(2), match.group(1))
    return outcomes


def first_errors(log: str) -> dict[str, str]:
    """The first `E ` line of each failed test's report."""
    parts = re.split(r"\n_{3,} \w+\.(\S+?)(?: \[[^\]]*\])? _{3,}\n", log)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        errors = [line.strip() for line in body.splitlines() if line.startswith("E ")]
        found.setdefault(name, errors[0][:200] if errors else "(no error line)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tests-from", type=Path, required=True, help="transformers checkout or git dir")
    parser.add_argument("--rev", default="HEAD", help="revision to read from a git dir (default HEAD)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stablelm-reftests"))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    extra = args.work / "extra"
    if not (extra / "parameterized").is_dir():  # the tests' one dependency the environment may lack
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(extra), "parameterized"],
            check=True,
        )
    tree = assemble(args.work, args.tests_from.resolve(), args.rev)
    reference = run(tree, extra, "reference", args.pytest_args)
    ours = run(tree, extra, "ours", args.pytest_args)
    passed = {name for name, outcome in reference.items() if outcome == "PASSED"}
    ours_passed = {name for name, outcome in ours.items() if outcome == "PASSED"}
    print(f"transformers' classes: {len(passed)} passed; stablelm's: {len(ours_passed)} passed")
    print(f"passing with transformers' classes and with stablelm's: {len(passed & ours_passed)}")
    errors = first_errors((args.work / "ours.log").read_text())
    for name in sorted(passed - ours_passed):
        print(f"  not with stablelm's: {name}: {errors.get(name, ours.get(name, 'skipped'))}")
    print(f"logs: {args.work / 'reference.log'}, {args.work / 'ours.log'}")


if __name__ == "__main__":
    main()
