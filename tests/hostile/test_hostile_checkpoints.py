"""Hostile and damaged checkpoints: each is refused with a CheckpointError naming the file (and tensor), or,
where the file is valid, loads exactly; and an interrupted save never leaves a folder that loads wrongly.

Safetensors files are written by hand here (8-byte little-endian header length, JSON header, data), and
the `safetensors` library is asked too: each file refused here is one it refuses as well.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config
from safetensors.torch import load_file, save_file

from stablelm import StableLmForCausalLM, cli
from stablelm import model as model_module
from stablelm.checkpoint import CheckpointError
from stablelm.checkpoint import save as save_module

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)
SHARD = "30KB"  # the small model in about 9 shards
ROOT = Path(__file__).resolve().parents[2]


def small_model(seed: int = 0, **overrides) -> StableLmForCausalLM:
    model = StableLmForCausalLM(tiny_config(**{**SMALL, **overrides}))
    randomize_(model, seed)
    return model.eval()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def message_of(err: pytest.ExceptionInfo) -> str:
    return str(err.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A single-file checkpoint of the small model, and its weights."""
    folder = tmp_path_factory.mktemp("saved")
    model = small_model(0)
    model.save_pretrained(folder)
    return folder, state_of(model)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---- 1. safetensors headers at least as strict as the safetensors library ---------------------------------
def entry(begin: int, end: int, shape: list = [2], dtype: str = "F32") -> str:  # noqa: B006
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})


def raw_safetensors(header: str, data: bytes) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + data


PAIR = "{" + f'"alpha": {entry(0, 8)}, "beta": {entry(8, 16)}' + "}"  # a valid two-tensor header
HOSTILE = [  # (id, header, data bytes, the tensor the message names, a phrase of the message)
    ("polyglot-trailing-bytes", PAIR, bytes(16) + b"PK\x05\x06" + bytes(18), "beta", "follow the last tensor"),
    ("overlap", "{" + f'"alpha": {entry(0, 8)}, "beta": {entry(4, 12)}' + "}", bytes(12), "beta", "overlaps"),
    ("gap-before-first", "{" + f'"alpha": {entry(4, 12)}, "beta": {entry(12, 20)}' + "}", bytes(20), "alpha", "hole"),
    ("hole-between", "{" + f'"alpha": {entry(0, 8)}, "beta": {entry(12, 20)}' + "}", bytes(20), "beta", "hole"),
    ("duplicate-key", "{" + f'"alpha": {entry(0, 8)}, "alpha": {entry(8, 16)}' + "}", bytes(16), "alpha", "twice"),
    ("float-offsets", "{" + f'"alpha": {entry(0, 8)}, "beta": ' + '{"dtype": "F32", "shape": [2], "data_offsets": [8.0, 16.0]}}', bytes(16), "beta", "malformed"),
    ("nan-offset", "{" + f'"alpha": {entry(0, 8)}, "beta": ' + '{"dtype": "F32", "shape": [2], "data_offsets": [8, NaN]}}', bytes(16), "beta", "malformed"),
    ("string-in-shape", "{" + f'"alpha": {entry(0, 8, ["2"])}, "beta": {entry(8, 16)}' + "}", bytes(16), "alpha", "malformed"),
    ("bool-in-shape", "{" + f'"alpha": {entry(0, 8, [True, 2])}, "beta": {entry(8, 16)}' + "}", bytes(16), "alpha", "malformed"),
    ("negative-offsets", "{" + f'"alpha": {entry(-8, 0)}, "beta": {entry(0, 8)}' + "}", bytes(8), "alpha", "malformed"),
    ("overflowing-offsets", "{" + f'"alpha": {entry(2**64, 2**64 + 8)}, "beta": {entry(0, 8)}' + "}", bytes(8), "alpha", "hole"),
    ("shape-beyond-int64", "{" + f'"alpha": {entry(0, 0, [0, 2**63])}, "beta": {entry(0, 8)}' + "}", bytes(8), "alpha", "inconsistent"),
    ("size-not-shape-times-dtype", "{" + f'"alpha": {entry(0, 8, [3])}, "beta": {entry(8, 16)}' + "}", bytes(16), "alpha", "inconsistent"),
    ("three-offsets", "{" + f'"alpha": {json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]})}, "beta": {entry(8, 16)}' + "}", bytes(16), "alpha", "malformed"),
    ("metadata-not-strings", '{"__metadata__": {"format": 1}, ' + PAIR[1:], bytes(16), "__metadata__", "map of strings"),
]  # fmt: skip


@pytest.mark.parametrize(
    "header, data, tensor, phrase", [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_safetensors_headers_are_refused(saved, tmp_path, header, data, tensor, phrase):
    folder = copy_of(saved[0], tmp_path / "c")
    path = folder / "model.safetensors"
    path.write_bytes(raw_safetensors(header, data))
    with pytest.raises(Exception):  # noqa: B017 - the library's errors vary: the point is that it refuses
        load_file(path)
    with pytest.raises(CheckpointError, match="not a valid safetensors weights file") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(path) in message_of(err) and repr(tensor) in message_of(err) and phrase in message_of(err)


def test_a_valid_hand_written_file_passes_the_same_checks(saved, tmp_path):
    """The hostile files above differ from this one only where they break a rule: it is read."""
    from stablelm.checkpoint.readers import SafetensorsReader

    path = tmp_path / "pair.safetensors"
    values = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    padded = PAIR + " " * 3  # the library pads headers with spaces
    path.write_bytes(raw_safetensors(padded, values))
    assert {k: v.tolist() for k, v in load_file(path).items()} == {"alpha": [1.0, 2.0], "beta": [3.0, 4.0]}
    reader = SafetensorsReader(path)
    got = dict(reader.materialise(["alpha", "beta"], dtype=torch.float32, device=torch.device("cpu")))
    assert {k: v.tolist() for k, v in got.items()} == {"alpha": [1.0, 2.0], "beta": [3.0, 4.0]}


def test_a_non_safetensors_file_is_refused_without_echoing_its_bytes(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path / "c")
    content = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a valid safetensors weights file") as err:
        StableLmForCausalLM.from_pretrained(folder)
    (as_length,) = struct.unpack("<Q", content[:8])
    assert str(folder / "model.safetensors") in message_of(err)
    assert str(as_length) not in message_of(err) and "root:" not in message_of(err)


# ---- 2. NaN and infinities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "stored, loaded", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
)
def test_non_finite_weights_are_refused_with_the_tensor_named(saved, tmp_path, bad, stored, loaded):
    folder = copy_of(saved[0], tmp_path / "c")
    tensors = {k: v.to(stored) for k, v in load_file(folder / "model.safetensors").items()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or infinite") as err:
        StableLmForCausalLM.from_pretrained(folder, dtype=loaded or "auto")
    assert str(folder / "model.safetensors") in message_of(err)
    assert "'model.layers.1.mlp.up_proj.weight'" in message_of(err) and "1 NaN" in message_of(err)


def test_non_finite_weights_in_a_bin_shard_name_that_shard(saved, tmp_path):
    model = small_model(0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path, max_shard_size=SHARD, safe_serialization=False)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    shard = tmp_path / index["weight_map"]["model.norm.weight"]
    with pytest.raises(CheckpointError, match="NaN or infinite") as err:
        StableLmForCausalLM.from_pretrained(tmp_path)
    assert str(shard) in message_of(err) and "'model.norm.weight'" in message_of(err)


def test_finite_checkpoints_still_load_exactly(saved):
    assert_same_weights(StableLmForCausalLM.from_pretrained(saved[0]), saved[1])


# ---- 3. saving over a checkpoint switches it at once --------------------------------------------------------
class Interrupted(RuntimeError):
    pass


def interrupt_writes(monkeypatch, at: str) -> None:
    """Make save_pretrained fail at the second shard it writes, or just before it writes the index."""
    real_save, real_json = save_module.save_file, save_module._write_json
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if at == "second shard" and len(calls) == 2:
            Path(path).write_bytes(b"half a shard")
            raise Interrupted
        real_save(tensors, path, metadata=metadata)

    def write_json(path, data):
        if at == "index" and path.name.endswith(".index.json"):
            raise Interrupted
        real_json(path, data)

    monkeypatch.setattr(save_module, "save_file", save_file)
    monkeypatch.setattr(save_module, "_write_json", write_json)


@pytest.mark.parametrize(
    "old_shards", [None, SHARD, "40KB"], ids=["old-single", "old-same-count", "old-other-count"]
)
@pytest.mark.parametrize("at", ["second shard", "index"])
def test_an_interrupted_sharded_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, old_shards, at):
    old, new = small_model(0), small_model(1)
    old.save_pretrained(tmp_path, **({"max_shard_size": old_shards} if old_shards else {}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    interrupt_writes(monkeypatch, at)
    with pytest.raises(Interrupted):
        new.save_pretrained(tmp_path, max_shard_size=SHARD)
    monkeypatch.undo()
    assert_same_weights(StableLmForCausalLM.from_pretrained(tmp_path), state_of(old))
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    new.save_pretrained(tmp_path, max_shard_size=SHARD)  # the next save switches, and clears the rest
    assert_same_weights(StableLmForCausalLM.from_pretrained(tmp_path), state_of(new))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    named = set(index["weight_map"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {*named, "model.safetensors.index.json", "config.json", "generation_config.json"}
    )


def test_a_save_killed_mid_shard_leaves_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    old, new = small_model(0), small_model(1)
    folder, source = tmp_path / "model", tmp_path / "new"
    old.save_pretrained(folder, max_shard_size=SHARD)
    new.save_pretrained(source)
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from stablelm import StableLmForCausalLM\n"
        "from stablelm.checkpoint import save as save_module\n"
        "real, calls = save_module.save_file, []\n"
        "def dying(tensors, path, metadata=None):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:\n"
        "        Path(path).write_bytes(b'half a shard')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(tensors, path, metadata=metadata)\n"
        "save_module.save_file = dying\n"
        "StableLmForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(source), str(folder), SHARD], cwd=ROOT, timeout=120)
    assert run.returncode == -signal.SIGKILL
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the shard it was writing, under its temporary name
    assert_same_weights(StableLmForCausalLM.from_pretrained(folder), state_of(old))

    new.save_pretrained(folder, max_shard_size=SHARD)
    assert_same_weights(StableLmForCausalLM.from_pretrained(folder), state_of(new))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {
            *index["weight_map"].values(),
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
        }
    )


KILL_AFTER_SWITCH = (
    "import os, signal, sys\n"
    "from stablelm import StableLmForCausalLM\n"
    "from stablelm.checkpoint import save as save_module\n"
    "def dying(*args, **kwargs):\n"  # the weights have switched; the config files are still pending
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "save_module._remove_stale = dying\n"
    "model = StableLmForCausalLM.from_pretrained(sys.argv[1])\n"
    "model.save_pretrained(sys.argv[2], **({'max_shard_size': sys.argv[3]} if len(sys.argv) > 3 else {}))\n"
)


@pytest.mark.parametrize("shards", [None, SHARD], ids=["single", "sharded"])
def test_a_save_killed_after_its_weights_switched_loads_as_the_new_model(tmp_path, shards):
    # the new model differs from the old in its config as well as its weights (same shapes)
    old, new = small_model(0), small_model(1, rope_theta=500000.0, layer_norm_eps=1e-3)
    new.generation_config = {"max_new_tokens": 7}
    folder, source = tmp_path / "model", tmp_path / "new"
    old.save_pretrained(folder, **({"max_shard_size": shards} if shards else {}))
    new.save_pretrained(source)
    run = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_SWITCH, str(source), str(folder), *([shards] if shards else [])],
        cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 10000.0  # still the old one
    assert [p.name for p in folder.iterdir() if p.name.endswith(".pending")]
    # a config read alone finishes the save too
    from stablelm import StableLmConfig

    assert StableLmConfig.from_pretrained(folder).rope_theta == 500000.0
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".pending")]
    loaded = StableLmForCausalLM.from_pretrained(folder)
    assert loaded.config.rope_theta == 500000.0 and loaded.config.layer_norm_eps == 1e-3
    assert json.loads((folder / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert_same_weights(loaded, state_of(new))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, new(ids).logits)


def test_a_save_killed_before_its_weights_switched_keeps_the_old_config(tmp_path):
    old, new = small_model(0), small_model(1, rope_theta=500000.0)
    folder, source = tmp_path / "model", tmp_path / "new"
    old.save_pretrained(folder, max_shard_size=SHARD)
    new.save_pretrained(source)
    code = KILL_AFTER_SWITCH.replace("save_module._remove_stale = dying", "save_module._write_json = dying")
    run = subprocess.run([sys.executable, "-c", code, str(source), str(folder), SHARD], cwd=ROOT, timeout=120)
    assert run.returncode == -signal.SIGKILL
    pending = [p for p in folder.iterdir() if p.name.endswith(".pending")]
    assert pending  # the new config, written before the weights, never put in place
    loaded = StableLmForCausalLM.from_pretrained(folder)
    assert loaded.config.rope_theta == 10000.0
    assert_same_weights(loaded, state_of(old))
    assert all(p.exists() for p in pending)  # not this save's: a load leaves them
    new.save_pretrained(folder, max_shard_size=SHARD)  # the next save clears them
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".pending", ".tmp"))]
    assert StableLmForCausalLM.from_pretrained(folder).config.rope_theta == 500000.0


def test_an_interrupted_save_removes_its_pending_config(tmp_path, monkeypatch):
    small_model(0).save_pretrained(tmp_path)
    interrupt_writes(monkeypatch, "second shard")
    with pytest.raises(Interrupted):
        small_model(1, rope_theta=500000.0).save_pretrained(tmp_path, max_shard_size=SHARD)
    monkeypatch.undo()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".pending")]
    assert StableLmForCausalLM.from_pretrained(tmp_path).config.rope_theta == 10000.0


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    small_model(0).save_pretrained(tmp_path)
    live = tmp_path / f".model.safetensors.{os.getppid()}.tmp"  # a running process (our parent) writing it
    theirs = tmp_path / ".notes.txt.1.tmp"  # not a name save_pretrained writes
    live.write_bytes(b"being written")
    theirs.write_bytes(b"someone else's")
    small_model(1).save_pretrained(tmp_path)
    assert live.exists() and theirs.exists()


def test_the_loader_refuses_an_index_whose_shards_were_swapped(tmp_path):
    """The loader's side: each tensor must be in the shard the index names, and in one shard only."""
    small_model(0).save_pretrained(tmp_path, max_shard_size=SHARD)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    (tmp_path / first).rename(tmp_path / "swap")
    (tmp_path / second).rename(tmp_path / first)
    (tmp_path / "swap").rename(tmp_path / second)
    with pytest.raises(CheckpointError, match="does not hold it") as err:
        StableLmForCausalLM.from_pretrained(tmp_path)
    assert str(index_path) in message_of(err)


# ---- 4. the config against the checkpoint, before building anything ----------------------------------------
@pytest.fixture
def layers_built(monkeypatch) -> list[int]:
    """Count decoder layers built, and fail past 4: a model of the hostile config is never built."""
    built: list[int] = []
    real = model_module.DecoderLayer.__init__

    def counted(self, config, layer_idx):
        built.append(layer_idx)
        if len(built) > 4:
            raise AssertionError(f"built {len(built)} decoder layers before checking the checkpoint")
        real(self, config, layer_idx)

    monkeypatch.setattr(model_module.DecoderLayer, "__init__", counted)
    return built


def with_config(saved: Path, dst: Path, **changes) -> Path:
    folder = copy_of(saved, dst)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_config_with_a_million_layers_is_refused_before_building(saved, tmp_path, layers_built):
    folder = with_config(saved[0], tmp_path / "c", num_hidden_layers=10**6)
    with pytest.raises(CheckpointError, match="num_hidden_layers to 1000000") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "model.safetensors") in message_of(err) and "2 decoder layers" in message_of(err)
    assert layers_built == []


def test_layer_shapes_are_compared_before_building(saved, tmp_path, layers_built):
    folder = with_config(saved[0], tmp_path / "c", intermediate_size=4096, num_hidden_layers=2)
    with pytest.raises(
        CheckpointError, match=r"mlp\.up_proj\.weight: the model expects shape \[4096, 64\]"
    ) as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "model.safetensors") in message_of(err)
    assert layers_built == [0]  # the one layer compared with, not the model


@pytest.mark.parametrize("changes, phrase", [({"num_hidden_layers": 10**6}, "num_hidden_layers to 1000000"),
                                             ({"hidden_size": 128}, "embed_tokens.weight: the model expects")])  # fmt: skip
def test_info_reports_a_config_that_does_not_fit_as_an_error(
    saved, tmp_path, capsys, layers_built, changes, phrase
):
    folder = with_config(saved[0], tmp_path / "c", **changes)
    assert cli.main(["info", "-m", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "parameters" not in captured.out
    assert captured.err.startswith("stablelm: error: ") and phrase in captured.err
    assert str(folder / "model.safetensors") in captured.err and "AssertionError" not in captured.err


def test_info_still_describes_a_checkpoint_that_fits(saved, capsys):
    assert cli.main(["info", "-m", str(saved[0])]) == 0
    assert f"{sum(t.numel() for t in saved[1].values()):,}" in capsys.readouterr().out


# ---- 5. a stored head under tie_word_embeddings ------------------------------------------------------------
def test_a_stored_head_that_differs_is_kept_untied_with_a_warning(tmp_path):
    untied = small_model(0)
    untied.save_pretrained(tmp_path / "untied")
    with_config(tmp_path / "untied", tmp_path / "tied", tie_word_embeddings=True)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="tie_word_embeddings") as caught:
        model = StableLmForCausalLM.from_pretrained(tmp_path / "tied")
    assert str(tmp_path / "tied" / "model.safetensors") in str(caught[0].message)
    assert caught[0].filename == __file__
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert_same_weights(model, state_of(untied))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, untied(ids).logits)
    model.save_pretrained(tmp_path / "again")  # saved as it now is: untied, and reloaded without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_weights(StableLmForCausalLM.from_pretrained(tmp_path / "again"), state_of(untied))


def test_a_stored_head_equal_to_the_embedding_stays_tied_silently(tmp_path):
    model = small_model(0)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / "untied")
    folder = with_config(tmp_path / "untied", tmp_path / "tied", tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = StableLmForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# ---- 6 and 7. legacy .bin files ----------------------------------------------------------------------------
def bin_folder(saved: Path, dst: Path, content: object, *, legacy: bool) -> Path:
    folder = copy_of(saved, dst)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save(content, f, _use_new_zipfile_serialization=not legacy)
    return folder


def test_an_old_format_bin_loads_exactly(saved, tmp_path):
    folder = bin_folder(saved[0], tmp_path / "c", saved[1], legacy=True)
    assert_same_weights(StableLmForCausalLM.from_pretrained(folder), saved[1])


class _Planted:
    """Unpickling this would create a marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_old_format_bin_that_would_run_code_is_refused(saved, tmp_path):
    marker = tmp_path / "marker"
    folder = bin_folder(saved[0], tmp_path / "c", {**saved[1], "payload": _Planted(marker)}, legacy=True)
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in message_of(err) and not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_files_are_refused_before_torch_2_6(saved, tmp_path, monkeypatch, legacy):
    folder = bin_folder(saved[0], tmp_path / "c", saved[1], legacy=legacy)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(CheckpointError, match="CVE-2025-32434") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in message_of(err) and "2.5.1" in message_of(err)
    assert "safetensors" in message_of(err)
    assert_same_weights(StableLmForCausalLM.from_pretrained(saved[0]), saved[1])  # safetensors still load


# ---- 8. symbolic links and paths out of the folder ---------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_link_out_of_the_folder_is_refused(saved, tmp_path, name):
    folder = copy_of(saved[0], tmp_path / "c")
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(folder / name) in message_of(err)


def test_a_shard_linked_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "c"
    small_model(0).save_pretrained(folder, max_shard_size=SHARD)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    outside = tmp_path / shard.name
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        StableLmForCausalLM.from_pretrained(folder)
    assert str(shard) in message_of(err)


def test_links_inside_the_folder_are_followed(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path / "c")
    (folder / "blobs").mkdir()
    (folder / "model.safetensors").rename(folder / "blobs" / "weights")
    (folder / "model.safetensors").symlink_to(Path("blobs") / "weights")
    assert_same_weights(StableLmForCausalLM.from_pretrained(folder), saved[1])


def hub_cache(src: Path, cache: Path, *, outside: Path | None = None) -> Path:
    """`src` as a Hugging Face cache snapshot: each file a relative link to ../../blobs/<name>."""
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in src.iterdir():
        shutil.copy(path, repo / "blobs" / f"blob-{path.name}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob-{path.name}"))
    if outside is not None:  # one file of the snapshot points out of the repo's cache folder
        (snapshot / "model.safetensors").unlink()
        (snapshot / "model.safetensors").symlink_to(outside)
    return snapshot


def test_a_hub_cache_snapshot_loads_through_its_blob_links(saved, tmp_path):
    snapshot = hub_cache(saved[0], tmp_path / "cache")
    assert_same_weights(StableLmForCausalLM.from_pretrained(snapshot), saved[1])


def test_a_hub_cache_link_out_of_the_repo_is_refused(saved, tmp_path):
    snapshot = hub_cache(saved[0], tmp_path / "cache", outside=saved[0] / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        StableLmForCausalLM.from_pretrained(snapshot)
    assert str(snapshot / "model.safetensors") in message_of(err)


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_an_index_naming_a_file_out_of_the_folder_does_not_echo_it(tmp_path, where):
    folder = tmp_path / "c"
    small_model(0).save_pretrained(folder, max_shard_size=SHARD)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = str(secret) if where == "absolute" else "../secret"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder") as err:
        StableLmForCausalLM.from_pretrained(folder)
    (as_length,) = struct.unpack("<Q", b"root:x:0")
    assert str(index_path) in message_of(err)
    assert "root:" not in message_of(err) and str(as_length) not in message_of(err)
