"""STABLELM_HUGE_PAGES=1: CPU weights copied out of the checkpoint's memory map into one anonymous mapping
advised for transparent huge pages (`stablelm.checkpoint.huge_pages`), the same values and the same model
for everything a user does with it; off by default and with the kernels off; a bad value refused."""

from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from stablelm import StableLmForCausalLM
from stablelm.checkpoint import huge_pages


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hp")
    torch.manual_seed(0)
    StableLmForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture
def thp(monkeypatch):
    """The OS offers transparent huge pages (whatever this machine's setting: the copy is what is tested)."""
    monkeypatch.setattr(huge_pages, "_thp_available", lambda: True)


def mapping_of(tensor: torch.Tensor) -> str:
    """The /proc/self/maps line of the mapping holding the tensor's data (Linux)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return line
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages and /proc/self/maps are Linux's")
def test_weights_leave_the_file_mapping_for_an_anonymous_one_with_the_same_values(
    checkpoint, thp, monkeypatch
):
    plain = StableLmForCausalLM.from_pretrained(checkpoint)
    assert "model.safetensors" in mapping_of(plain.lm_head.weight)  # the default: the file's own pages
    monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
    model = StableLmForCausalLM.from_pretrained(checkpoint)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for param in model.parameters():
        assert param.data_ptr() % 64 == 0 and "safetensors" not in mapping_of(param)
    ids = torch.tensor([[1, 2, 3, 4]])
    want = plain.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_the_copy_is_a_model_like_any_other(checkpoint, thp, monkeypatch, tmp_path):
    """Training, in-place edits, saving and reloading; the weights outlive the model that loaded them."""
    monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
    model = StableLmForCausalLM.from_pretrained(checkpoint)
    reference = StableLmForCausalLM.from_pretrained(checkpoint, optimize=False)  # the file's mapping
    if sys.platform.startswith("linux"):
        assert "safetensors" not in mapping_of(model.lm_head.weight)
        assert "safetensors" in mapping_of(reference.lm_head.weight)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for m in (model, reference):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # in place: the copy changes, the file does not
    model.save_pretrained(tmp_path / "saved")
    again = StableLmForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.lm_head.weight, reference.lm_head.weight + 1.0)
    assert torch.equal(
        StableLmForCausalLM.from_pretrained(checkpoint).lm_head.weight, reference.lm_head.weight
    )

    kept = StableLmForCausalLM.from_pretrained(checkpoint).model.norm.weight
    gc.collect()  # the model is gone; its arena lives on in the tensor
    assert torch.equal(kept, reference.model.norm.weight)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
@pytest.mark.parametrize("how", ["optimize=False", "STABLELM_OPTIMIZE=0", "unset", "0"])
def test_off_by_default_and_with_the_kernels_off(checkpoint, thp, monkeypatch, how):
    kwargs = {}
    if how == "optimize=False":
        monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
        kwargs["optimize"] = False
    elif how == "STABLELM_OPTIMIZE=0":
        monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
        monkeypatch.setenv("STABLELM_OPTIMIZE", "0")
    elif how == "unset":
        monkeypatch.delenv("STABLELM_HUGE_PAGES", raising=False)
    else:
        monkeypatch.setenv("STABLELM_HUGE_PAGES", how)
    model = StableLmForCausalLM.from_pretrained(checkpoint, **kwargs)
    assert "model.safetensors" in mapping_of(model.lm_head.weight)


def test_without_the_os_offering_them_the_weights_stay_mapped(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
    setting = tmp_path / "enabled"
    for text, offered in (
        ("always madvise [never]\n", False),
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
    ):
        setting.write_text(text)
        assert huge_pages._thp_available.__wrapped__(setting) is offered
    assert huge_pages._thp_available.__wrapped__(tmp_path / "missing") is False


@pytest.mark.parametrize("value", ["maybe", "2", "yes please"])
def test_a_bad_value_is_refused_naming_the_variable(checkpoint, monkeypatch, value):
    monkeypatch.setenv("STABLELM_HUGE_PAGES", value)
    with pytest.raises(ValueError, match=re.escape(f"STABLELM_HUGE_PAGES={value!r} is not understood")):
        StableLmForCausalLM.from_pretrained(checkpoint)


def test_an_arena_hands_out_aligned_slots_and_refuses_overflow():
    arena = huge_pages.Arena(huge_pages.arena_bytes([10, 100]))
    a = arena.take(torch.uint8, (10,), 10)
    b = arena.take(torch.float32, (5, 5), 100)
    assert a.data_ptr() % huge_pages.HUGE_PAGE == 0 and b.data_ptr() - a.data_ptr() == 64
    b.fill_(2.5)
    a.fill_(7)
    assert torch.all(b == 2.5) and torch.all(a == 7)
    with pytest.raises(ValueError, match="bytes left"):
        arena.take(torch.uint8, (huge_pages.HUGE_PAGE * 2,), huge_pages.HUGE_PAGE * 2)


def test_unset_means_off_except_where_a_command_prefers_it(monkeypatch):
    import threading

    monkeypatch.delenv("STABLELM_HUGE_PAGES", raising=False)
    assert huge_pages.requested() is False
    seen = []
    with huge_pages.preferred():
        assert huge_pages.requested() is True
        thread = threading.Thread(
            target=lambda: seen.append(huge_pages.requested())
        )  # another thread: its own
        thread.start()
        thread.join()
        monkeypatch.setenv("STABLELM_HUGE_PAGES", "0")  # the user's word wins
        assert huge_pages.requested() is False
        monkeypatch.setenv("STABLELM_HUGE_PAGES", "1")
        assert huge_pages.requested() is True
        monkeypatch.setenv("STABLELM_HUGE_PAGES", "")
        assert huge_pages.requested() is True
    assert seen == [False] and huge_pages.requested() is False
