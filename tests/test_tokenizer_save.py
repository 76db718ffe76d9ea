"""Adding tokens to the tokenizer and saving it, against the reference on the two fixture tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken

from stablelm.tokenizer import AutoTokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["gpt-neox-20b", "cl100k-dolma2"]
ROLES = {"extra_special_tokens": ["<|user|>", "<|assistant|>"], "pad_token": "<|pad|>"}
TEXTS = [
    "<|user|>\nWhat does the for statement do?<|pad|><|assistant|>\nIt iterates.<|endoftext|>",
    "a newword and anothernewword, newwordy",
    "plain text with no added tokens \u2014 and \u6771\u4eac",
]


def _checkpoint(tmp_path: Path, name: str) -> Path:
    """The fixture's files with a StableLM config.json, as the reference sees a hub checkpoint."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "stablelm"}))
    return folder


@pytest.fixture(params=NAMES)
def pair(request, tmp_path):
    folder = _checkpoint(tmp_path, request.param)
    return AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _add(tokenizer) -> tuple[int, int]:
    return tokenizer.add_special_tokens(ROLES), tokenizer.add_tokens(["newword", "anothernewword"])


def _assert_same(ours, ref) -> None:
    assert len(ours) == len(ref)
    assert ours.special_tokens_map == {k: v for k, v in ref.special_tokens_map.items() if isinstance(v, str)}
    assert ours.extra_special_tokens == [str(t) for t in ref.extra_special_tokens]
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_add_tokens_and_special_tokens_match_reference(pair):
    ours, ref = pair
    size = len(ours)
    assert _add(ours) == _add(ref)
    assert ours.pad_token == "<|pad|>" and ours.pad_token_id == ref.pad_token_id
    assert ours.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|pad|>"]) == ref.convert_tokens_to_ids(
        ["<|user|>", "<|assistant|>", "<|pad|>"]
    )
    assert len(ours) == len(ref) > size
    assert "<|user|>" in ours.all_special_tokens and "newword" not in ours.all_special_tokens
    _assert_same(ours, ref)
    assert _add(ours) == _add(ref)  # again: the vocabulary does not grow
    assert len(ours) == len(ref)


def test_extra_special_tokens_extend_or_replace(pair):
    ours, ref = pair
    for tokenizer in (ours, ref):
        tokenizer.add_special_tokens({"extra_special_tokens": ["<|a|>"]})
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|b|>"]}, replace_extra_special_tokens=False
        )
    assert ours.extra_special_tokens == [str(t) for t in ref.extra_special_tokens] == ["<|a|>", "<|b|>"]
    for tokenizer in (ours, ref):
        tokenizer.add_special_tokens({"extra_special_tokens": ["<|c|>"]})
    assert ours.extra_special_tokens == ["<|c|>"]
    assert ours.convert_tokens_to_ids("<|a|>") == ref.convert_tokens_to_ids(
        "<|a|>"
    )  # still in the vocabulary


def test_added_token_objects_keep_their_options(pair):
    ours, _ = pair
    ours.add_tokens([AddedToken("  spaced", lstrip=True)])
    assert ours.backend_tokenizer.get_added_tokens_decoder()[len(ours) - 1].lstrip


def test_bad_special_tokens_are_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="Unknown special token name.*'user_token'"):
        ours.add_special_tokens({"user_token": "<|user|>"})
    with pytest.raises(ValueError, match="pad_token must be a token string"):
        ours.add_special_tokens({"pad_token": 5})
    with pytest.raises(ValueError, match="extra_special_tokens must be a list"):
        ours.add_special_tokens({"extra_special_tokens": "<|user|>"})
    with pytest.raises(TypeError, match="non-empty strings"):
        ours.add_tokens(["ok", ""])


def test_saved_tokenizer_loads_the_same_here_and_in_the_reference(pair, tmp_path):
    ours, ref = pair
    _add(ours)
    _add(ref)
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name.endswith(".tmp")]
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    _assert_same(again, ref)  # ours, reloaded, against the reference that added the same tokens
    _assert_same(ours, reference)  # the reference, loading our files, against ours
    assert again.model_max_length == ours.model_max_length == reference.model_max_length
    assert again.chat_template == ours.chat_template
    messages = [{"role": "user", "content": "hi"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered


def test_save_replaces_an_earlier_tokenizers_templates(tmp_path):
    folder = _checkpoint(tmp_path, "gpt-neox-20b")
    (folder / "chat_template.jinja").write_text("OLD {{ messages[0]['content'] }}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("OLD TOOLS")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "NEW {{ messages[0]['content'] }}"
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template == "NEW {{ messages[0]['content'] }}"


def test_named_templates_are_saved(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")
    tokenizer.chat_template = {"default": "D {{ messages[0]['content'] }}", "rag": "R"}
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


def test_save_into_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")
    with pytest.raises(NotADirectoryError, match="is a file"):
        tokenizer.save_pretrained(tmp_path / "file")
