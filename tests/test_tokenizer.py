"""The tokenizer against the reference (transformers' AutoTokenizer) on the two fixture tokenizers.

The reference is loaded from a StableLM checkpoint layout: the fixture's files plus a config.json with
model_type "stablelm", which is what `AutoTokenizer.from_pretrained("stabilityai/...")` sees. With that
config the reference runs tokenizer.json as it is. On the bare fixture folders it instead picks a class from
`tokenizer_class`, and its GPT2Tokenizer rebuilds the pipeline with GPT-2's pre-tokenizer, dropping the
cl100k split regex that tokenizer.json names (see `test_bare_folder_uses_tokenizer_json_as_is`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jinja2
import pytest
import tokenizers
import torch

from stablelm.tokenizer import (
    AutoTokenizer,
    BatchEncoding,
    ChatTemplateError,
    ChatTemplateSecurityError,
    StreamingDetokenizer,
    Tokenizer,
    chat_template,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["gpt-neox-20b", "cl100k-dolma2"]

CORPUS = [
    "The weather is always wonderful",
    "My favorite food has always been pizza, but lately",
    "Hello, world! It's a test: don't panic; we're fine. (Really?) \"Quoted\" text \u2014 an em dash\u2026",
    "def f(x):\n\tif x  >  1:\n\t\treturn x    +  2\n        # eight spaces\n\n\n    pass\t\t\n",
    "    leading and trailing spaces    ",
    "Numbers: 0 7 42 3.14159 1,234,567 -12e-3 0x1F 2024-01-31 12345678901234567890 \u0663\u0664\u0665 \u2460\u2461",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u6211\u7231\u5317\u4eac\uff01"
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8. \u4e2d\u6587\uff0c\u5168\u89d2\u6807\u70b9\u3002",
    "Emoji \U0001f600\U0001f389\U0001f44d\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "flag \U0001f1ef\U0001f1f5 math \U0001d518\U0001d52b\U0001d526 \U0001d7d9\U0001d7da gothic \U00010348 "
    "CJK-B \U0002070e\U00020731",
    "Combining: e\u0301 a\u0300 n\u0303 A\u030a (\u00c5ngstr\u00f6m) o\u0308\u0304 z\u0351\u0357\u0330",
    "Special tokens in text: <|endoftext|>Hello<|endoftext|> <|padding|> <|im_start|>user\nhi<|im_end|> "
    "<|extra_id_0|><|endoftext|>",
    "",
    " ",
    "\n\n\t \r\n",
    "nbsp\u00a0em-space\u2003zero-width\u200bBOM\ufeffend",
    "\u00dcn\u00efc\u00f6d\u00e9 \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940",
    "a" * 300 + " " + "ab" * 100,
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. \u00c9t\u00e9 \U0001f600"},
    {"role": "user", "content": 'List 3 synonyms for the word "tiny".'},
    {"role": "assistant", "content": "Small, little, minute."},
    {"role": "user", "content": "And for \u5927?\n\tPlease."},
]


def _document(size: int = 100_000) -> str:
    """A ~100 KB document mixing prose, code, numbers, scripts, emoji and special tokens."""
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they I at be this have".split()
    parts, length = [], 0
    while length < size:
        kind = rng.randrange(4)
        if kind == 0:
            piece = rng.choice(CORPUS)
        elif kind == 1:
            piece = " ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))).capitalize() + ". "
        elif kind == 2:
            piece = f"\n{' ' * rng.randrange(9)}x_{rng.randrange(10**6)} =\t{rng.random() * 1e4:.3f}  # n\n"
        else:
            piece = "".join(
                chr(rng.choice([0x4E00, 0x1F600, 0x0400, 0x00E0]) + rng.randrange(64)) for _ in range(9)
            )
        parts.append(piece)
        length += len(piece.encode())
    return "".join(parts)


DOCUMENT = _document()


def _checkpoint(tmp_path: Path, name: str, *, config: dict | None = None, **files: str) -> Path:
    """A checkpoint-layout folder: the fixture's files, config.json, and any extra or replaced files."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    (folder / "config.json").write_text(
        json.dumps(config if config is not None else {"model_type": "stablelm"})
    )
    for filename, text in files.items():
        (folder / filename.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (folder / filename.replace("__", "/")).write_text(text)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory) -> tuple[Tokenizer, object]:
    """(ours, reference) loaded from the same checkpoint folder."""
    folder = _checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)
    return AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def padded_pair(pair):
    """The pair with the pad token set as the model's documentation sets it, restored afterwards."""
    ours, ref = pair
    saved = (ours.pad_token, ref.pad_token, ours.padding_side, ours.truncation_side)
    ours.pad_token = ours.eos_token
    ref.pad_token = ref.eos_token
    yield ours, ref
    ours.pad_token, ref.pad_token = saved[:2]
    ours.padding_side = ref.padding_side = saved[2]
    ours.truncation_side = ref.truncation_side = saved[3]


def _same(ours: BatchEncoding, ref) -> None:
    assert isinstance(ours, BatchEncoding)
    assert set(ours) == set(ref.keys()) == {"input_ids", "attention_mask"}
    for key in ours:
        if isinstance(ref[key], torch.Tensor):
            assert ours[key].dtype == ref[key].dtype == torch.long
            assert torch.equal(ours[key], ref[key]), key
        else:
            assert ours[key] == ref[key], key


# --- known values and loading ------------------------------------------------------------------------------


def test_known_values():
    tok = AutoTokenizer.from_pretrained(FIXTURES / "gpt-neox-20b")
    assert tok("The weather is always wonderful")["input_ids"] == [510, 8588, 310, 1900, 9386]
    assert tok.encode("My favorite food has always been pizza, but lately") == [
        3220, 7583, 2739, 556, 1900, 644, 22534, 13, 533, 21403,
    ]  # fmt: skip


def test_special_tokens_and_sizes_match_reference(pair):
    ours, ref = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id"), name
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    assert (len(ours), ours.vocab_size) == (len(ref), ref.vocab_size)
    assert ours.model_max_length == ref.model_max_length == 4096
    assert (ours.padding_side, ours.truncation_side) == (ref.padding_side, ref.truncation_side)
    assert ours.get_vocab() == ref.get_vocab()


@pytest.mark.parametrize("name", NAMES)
def test_bare_folder_defaults_match_reference_tokenizer_class(name):
    # Without config.json the reference uses the class named by tokenizer_class and its default tokens.
    ours = AutoTokenizer.from_pretrained(FIXTURES / name)
    ref = transformers.AutoTokenizer.from_pretrained(FIXTURES / name)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.pad_token_id == ref.pad_token_id
    if name == "gpt-neox-20b":
        assert (ours.pad_token, ours.pad_token_id) == ("<|padding|>", 1)
        assert ours(CORPUS)["input_ids"] == ref(CORPUS)["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_bare_folder_uses_tokenizer_json_as_is(name):
    ours = AutoTokenizer.from_pretrained(FIXTURES / name)
    raw = tokenizers.Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    assert ours(CORPUS + [DOCUMENT])["input_ids"] == [e.ids for e in raw.encode_batch(CORPUS + [DOCUMENT])]


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer.json in"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_unknown_repo_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="Cannot find model 'no-such-org/no-such-model'"):
        AutoTokenizer.from_pretrained("no-such-org/no-such-model", local_files_only=True)


def test_invalid_json_is_a_clear_error(tmp_path):
    folder = _checkpoint(tmp_path, "gpt-neox-20b", **{"tokenizer_config.json": "{not json"})
    with pytest.raises(ValueError, match="tokenizer_config.json' is not valid JSON"):
        AutoTokenizer.from_pretrained(folder)


def test_unreadable_special_token_is_a_clear_error(tmp_path):
    folder = _checkpoint(tmp_path, "gpt-neox-20b")
    _edit_config(folder, eos_token={"no": "content"})
    with pytest.raises(ValueError, match="eos_token must be a token string or an added-token dict"):
        AutoTokenizer.from_pretrained(folder)


def test_config_sources_match_reference(tmp_path):
    # Special tokens as added-token dicts, special_tokens_map.json, a model-specific token, padding side.
    folder = _checkpoint(
        tmp_path,
        "cl100k-dolma2",
        **{"special_tokens_map.json": json.dumps({"pad_token": "<|pad|>", "bos_token": "<|fim_prefix|>"})},
    )
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "rstrip": False,
           "normalized": False, "single_word": False, "special": True}  # fmt: skip
    _edit_config(
        folder, eos_token=eos, eot_token="<|fim_middle|>", padding_side="left", model_max_length=None
    )
    ours, ref = AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.special_tokens_map["eot_token"] == "<|fim_middle|>"
    assert (ours.pad_token, ours.pad_token_id) == (ref.pad_token, ref.pad_token_id)
    assert (len(ours), ours.padding_side, ours.model_max_length) == (len(ref), "left", ref.model_max_length)
    assert ours.all_special_ids == ref.all_special_ids
    _same(ours(CORPUS, padding=True), ref(CORPUS, padding=True))
    ids = ours(CORPUS[9])["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_add_bos_and_eos_match_reference(tmp_path):
    # As in the reference, the config's add_*_token is not used (tokenizer.json decides); the argument is.
    folder = _checkpoint(tmp_path, "gpt-neox-20b")
    _edit_config(folder, add_bos_token=True, add_eos_token=True)
    ours, ref = AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    _same(ours(CORPUS), ref(CORPUS))
    ours = AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    ref = transformers.AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    assert ours.add_bos_token and ours.add_eos_token
    assert ours("hi")["input_ids"] == [0, 5801, 0]
    _same(ours(CORPUS), ref(CORPUS))
    _same(ours(CORPUS, add_special_tokens=False), ref(CORPUS, add_special_tokens=False))
    for side in ("right", "left"):
        ours.truncation_side = ref.truncation_side = side
        _same(ours(CORPUS, truncation=True, max_length=5), ref(CORPUS, truncation=True, max_length=5))
    with pytest.raises(ValueError, match="max_length=1 leaves no room for the 2 special tokens"):
        ours("hello", max_length=1)


def test_chat_template_files_match_reference(tmp_path):
    folder = _checkpoint(
        tmp_path,
        "gpt-neox-20b",
        **{
            "chat_template.jinja": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
            "additional_chat_templates__terse.jinja": "{{ messages[-1].content }}",
            "generation_config.json": json.dumps({"eos_token_id": [0, 1], "max_new_tokens": 8}),
        },
    )
    ours, ref = AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == ref.chat_template  # the files win over tokenizer_config.json
    assert set(ours.chat_template) == {"default", "terse"}
    for name in (None, "terse"):
        kwargs = {"tokenize": False, "chat_template": name}
        assert ours.apply_chat_template(CONVERSATION, **kwargs) == ref.apply_chat_template(
            CONVERSATION, **kwargs
        )
    assert ours.generation_config == {"eos_token_id": [0, 1], "max_new_tokens": 8}


def test_named_templates_in_config(tmp_path):
    folder = _checkpoint(tmp_path, "gpt-neox-20b")
    _edit_config(
        folder, chat_template=[{"name": "a", "template": "A"}, {"name": "tool_use", "template": "T"}]
    )
    ours, ref = AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == ref.chat_template == {"a": "A", "tool_use": "T"}
    assert ours.apply_chat_template(CONVERSATION, chat_template="a", tokenize=False) == "A"
    assert ours.apply_chat_template(CONVERSATION, tools=[{"name": "f"}], tokenize=False) == "T"
    with pytest.raises(
        ValueError, match=r"several chat templates and none is named 'default'.*\['a', 'tool_use'\]"
    ):
        ours.apply_chat_template(CONVERSATION)


# --- encoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_reference(pair, add_special_tokens):
    ours, ref = pair
    for text in CORPUS + [DOCUMENT]:
        _same(
            ours(text, add_special_tokens=add_special_tokens),
            ref(text, add_special_tokens=add_special_tokens),
        )
    _same(ours(CORPUS + [DOCUMENT]), ref(CORPUS + [DOCUMENT]))
    assert ours.encode(DOCUMENT) == ref.encode(DOCUMENT)
    assert torch.equal(
        ours.encode(CORPUS[2], return_tensors="pt"), ref.encode(CORPUS[2], return_tensors="pt")
    )
    _same(ours(CORPUS[0], return_tensors="pt"), ref(CORPUS[0], return_tensors="pt"))
    _same(ours("", return_tensors="pt"), ref("", return_tensors="pt"))


PADDING_CASES = [
    {"padding": True},
    {"padding": "longest"},
    {"padding": "max_length", "max_length": 48},
    {"padding": "max_length"},  # pads to model_max_length
    {"padding": True, "truncation": True, "max_length": 16},
    {"padding": "max_length", "truncation": True, "max_length": 7},
    {"truncation": True, "max_length": 16},
    {"max_length": 5},  # max_length alone truncates
    {"truncation": True},  # to model_max_length: cuts the document
    {"padding": False, "truncation": False, "max_length": 3},
    {"padding": "do_not_pad", "truncation": "longest_first", "max_length": 9},
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "case", PADDING_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items())
)
def test_padding_and_truncation_match_reference(padded_pair, side, case):
    ours, ref = padded_pair
    ours.padding_side = ours.truncation_side = ref.padding_side = ref.truncation_side = side
    batch = CORPUS + [DOCUMENT]
    _same(ours(batch, **case), ref(batch, **case))
    _same(ours(CORPUS[3], **case), ref(CORPUS[3], **case))
    if (
        case.get("padding") in (True, "longest")
        or case.get("truncation")
        and case.get("padding") == "max_length"
    ):
        _same(ours(batch, return_tensors="pt", **case), ref(batch, return_tensors="pt", **case))


def test_padding_needs_a_pad_token(padded_pair):
    ours, ref = padded_pair
    ours.pad_token = ref.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*`tokenizer.pad_token = tokenizer.eos_token`"):
        ours(["a", "bb"], padding=True)
    with pytest.raises(ValueError):
        ref(["a", "bb"], padding=True)


def test_option_errors(pair):
    ours, _ = pair
    with pytest.raises(
        ValueError, match="Cannot make one tensor of texts with different lengths: pass padding=True"
    ):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors must be None, 'pt' or 'np', not 'tf'"):
        ours("a", return_tensors="tf")
    with pytest.raises(ValueError, match="padding must be one of"):
        ours(["a"], padding="shortest")
    with pytest.raises(ValueError, match="truncation must be one of None, False, True, 'longest_first'"):
        ours(["a"], truncation="only_third")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', not 'up'"):
        ours.padding_side = "up"
    with pytest.raises(TypeError, match="text must be a string or a list of strings, not"):
        ours([1, 2])
    with pytest.raises(TypeError, match="text must be a string or a list of strings, not None"):
        ours(None)
    with pytest.raises(ValueError, match=r"pad_token_id 999999 is not in the vocabulary \(size"):
        ours.pad_token_id = 999_999
    with pytest.raises(TypeError, match="pad_token must be a token string or None"):
        ours.pad_token = 5


def test_batch_encoding_is_a_dict_with_attributes(padded_pair):
    ours, _ = padded_pair
    enc = ours(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert enc.input_ids is enc["input_ids"] and enc.attention_mask.shape == (2, 2)
    assert enc.to("cpu") is enc and enc.input_ids.device.type == "cpu"
    assert dict(**enc).keys() == {"input_ids", "attention_mask"}  # as in model.generate(**inputs)
    with pytest.raises(AttributeError, match="BatchEncoding has no 'token_type_ids'"):
        _ = enc.token_type_ids


def test_settable_special_tokens(padded_pair):
    ours, ref = padded_pair
    ours.pad_token_id = ref.pad_token_id = 3
    assert (ours.pad_token, ours.pad_token_id) == (ref.pad_token, 3)
    assert ours(["a", "a b"], padding=True)["input_ids"] == ref(["a", "a b"], padding=True)["input_ids"]
    ours.pad_token = ref.pad_token = None
    assert ours.pad_token_id is None and "pad_token" not in ours.special_tokens_map


# --- decoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "error", "says"),
    [
        ([5, -2], ValueError, "got -2 at position 1"),
        (torch.tensor([3, -1]), ValueError, "got -1 at position 1"),
        (-3, ValueError, "got -3 at position 0"),
        ([2**64], ValueError, "from 0 to 2**32 - 1; got 18446744073709551616"),
        ([1.5], TypeError, "got 1.5 (float) at position 0"),
        (["a"], TypeError, "got 'a' (str)"),
        ([[1, 2], [3, None]], TypeError, "got None (NoneType) at position 1 of sequence 1"),
    ],
)
def test_decode_refuses_bad_ids_naming_them(pair, ids, error, says):
    # The backend's own errors ("number too small to fit in target type") name no argument.
    ours, _ = pair
    for decode in (ours.decode, ours.batch_decode):
        with pytest.raises(error, match="^token_ids must hold") as caught:
            decode(ids if decode is ours.decode or not isinstance(ids, int) else [ids])
        assert says in str(caught.value)
    assert ours.decode([5, 10**9]) == ours.decode(
        [5]
    )  # an id past the vocabulary decodes to nothing, as the reference


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_reference(padded_pair, skip):
    ours, ref = padded_pair
    rows = ours(CORPUS + [DOCUMENT])["input_ids"]
    for ids in rows:
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        # The configs ask for clean-up, which the reference skips for BPE: so must we.
        kwargs = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": True}
        assert ours.decode(ids, **kwargs) == ref.decode(ids, **kwargs)
    for side in ("right", "left"):
        ours.padding_side = ref.padding_side = side
        padded = ours(CORPUS, padding=True, return_tensors="pt")["input_ids"]
        expected = ref.batch_decode(padded, skip_special_tokens=skip)
        assert ours.batch_decode(padded, skip_special_tokens=skip) == expected
        assert ours.batch_decode(padded.tolist(), skip_special_tokens=skip) == expected
        assert ours.decode(padded, skip_special_tokens=skip) == ref.decode(padded, skip_special_tokens=skip)
    assert ours.decode(rows[0][0]) == ref.decode(rows[0][0])
    assert ours.batch_decode([]) == ref.batch_decode([]) == []
    # Slices that start or end inside a multi-byte character decode to U+FFFD in both.
    rng, doc = random.Random(1), rows[-1]
    for _ in range(300):
        start = rng.randrange(len(doc))
        ids = doc[start : start + rng.randrange(1, 12)]
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_token_conversions_match_reference(pair):
    ours, ref = pair
    ids = ours(CORPUS[9] + CORPUS[7])["input_ids"]
    tokens = ours.convert_ids_to_tokens(ids)
    assert tokens == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert ours.convert_ids_to_tokens(ids[3]) == ref.convert_ids_to_tokens(ids[3])
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens) == ids
    assert ours.convert_tokens_to_ids("no-such-token") == ref.convert_tokens_to_ids("no-such-token")
    assert ours.convert_tokens_to_ids(tokens[0]) == ids[0]


# --- chat templates ----------------------------------------------------------------------------------------

CHAT_CASES = [
    {"messages": CONVERSATION, "add_generation_prompt": True},
    {"messages": CONVERSATION, "add_generation_prompt": False},
    {"messages": CONVERSATION[1:2], "add_generation_prompt": True},
    {"messages": CONVERSATION[:3], "continue_final_message": True},
    {
        "messages": CONVERSATION[1:3] + [{"role": "assistant", "content": "Sure:  "}],
        "continue_final_message": True,
    },
]


@pytest.mark.parametrize("case", range(len(CHAT_CASES)))
def test_chat_template_matches_reference(padded_pair, case):
    ours, ref = padded_pair
    kwargs = dict(CHAT_CASES[case])
    messages = kwargs.pop("messages")
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, return_dict=False, **kwargs)
    assert ids == ref.apply_chat_template(messages, return_dict=False, **kwargs)
    assert ids == ours(text, add_special_tokens=False)["input_ids"]
    tensor = ours.apply_chat_template(messages, return_tensors="pt", return_dict=False, **kwargs)
    assert torch.equal(
        tensor, ref.apply_chat_template(messages, return_tensors="pt", return_dict=False, **kwargs)
    )
    # By default a BatchEncoding, as the reference's 5.x (lists, or tensors with return_tensors="pt").
    _same(ours.apply_chat_template(messages, **kwargs), ref.apply_chat_template(messages, **kwargs))
    _same(
        ours.apply_chat_template(messages, return_tensors="pt", **kwargs),
        ref.apply_chat_template(messages, return_tensors="pt", **kwargs),
    )
    batch = [messages, CONVERSATION[1:2]]
    options = {"padding": True, "return_tensors": "pt", **kwargs}
    _same(ours.apply_chat_template(batch, **options), ref.apply_chat_template(batch, **options))


def test_chat_template_sees_special_tokens_and_kwargs(pair):
    ours, ref = pair
    template = "{{ bos_token }}|{{ eos_token }}|{{ custom }}|{{ tools | tojson }}|{{ messages | tojson }}"
    messages = [{"role": "user", "content": "<b>&'\u00e9\U0001f600", "name": None}]
    kwargs = {"chat_template": template, "tokenize": False, "custom": [1, "x"], "tools": [{"name": "f<"}]}
    assert ours.apply_chat_template(messages, **kwargs) == ref.apply_chat_template(messages, **kwargs)
    assert "<b>&'\u00e9\U0001f600" in ours.apply_chat_template(messages, **kwargs)  # tojson does not escape


def test_strftime_now_and_loop_controls(pair):
    ours, _ = pair
    template = "{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
    template += "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    text = ours.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert text[:4].isdigit() and text[4:] == CONVERSATION[0]["content"]


def test_template_raise_exception_passes_message(pair):
    ours, ref = pair
    template = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    )
    with pytest.raises(
        ChatTemplateError, match="The chat template raised an error: System role not supported"
    ):
        ours.apply_chat_template(CONVERSATION, chat_template=template)
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        ref.apply_chat_template(CONVERSATION, chat_template=template)
    with pytest.raises(ChatTemplateError, match=r"failed to render: UndefinedError: .*no attribute 'nope'"):
        ours.apply_chat_template(CONVERSATION, chat_template="{{ messages[0].nope.deeper }}")
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja \(line 1\)"):
        ours.apply_chat_template(CONVERSATION, chat_template="{% for m in messages %}")


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ self.__init__.__globals__.__builtins__.open('MARKER', 'w') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{{ dict.__class__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_refused(pair, tmp_path, monkeypatch, template):
    ours, _ = pair
    marker = tmp_path / "MARKER"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ChatTemplateSecurityError, match="tried to reach outside the sandbox.*nothing it asked for"
    ):
        ours.apply_chat_template(CONVERSATION, chat_template=template.replace("MARKER", str(marker)))
    assert not marker.exists()
    assert CONVERSATION[0]["role"] == "system"


def test_chat_template_errors(pair):
    ours, _ = pair
    with pytest.raises(
        ValueError, match="continue_final_message and add_generation_prompt cannot both be set"
    ):
        ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(TypeError, match="Each chat message must be a dict"):
        ours.apply_chat_template(["hello"])
    with pytest.raises(TypeError, match="tools must be JSON-schema dicts"):
        ours.apply_chat_template(CONVERSATION, tools=[print])
    with pytest.raises(TypeError, match="documents must be dicts"):
        ours.apply_chat_template(CONVERSATION, documents=["text"])
    with pytest.raises(ValueError, match="final message has no string 'content' to continue"):
        ours.apply_chat_template([{"role": "user"}], continue_final_message=True)
    with pytest.raises(ValueError, match="the chat template never reads 'content'"):
        ours.apply_chat_template(
            CONVERSATION, continue_final_message=True, chat_template="{{ messages|length }}"
        )
    drops = "{% for m in messages %}{{ m['content'][:3] }}{% endfor %}"
    with pytest.raises(ValueError, match="final message does not appear in the rendered chat"):
        ours.apply_chat_template(CONVERSATION, continue_final_message=True, chat_template=drops)


def test_no_chat_template(tmp_path):
    folder = _checkpoint(tmp_path, "gpt-neox-20b")
    _edit_config(folder, chat_template=None)
    with pytest.raises(ValueError, match="has no chat template.*pass a Jinja template as chat_template="):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION)


def test_old_jinja_is_refused(pair, monkeypatch):
    ours, _ = pair
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    chat_template._environment.cache_clear()
    chat_template._compile.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"need jinja2>=3.1.6.*jinja2 3.1.5 is installed"):
            ours.apply_chat_template(CONVERSATION, tokenize=False)
    finally:
        chat_template._environment.cache_clear()
        chat_template._compile.cache_clear()


# --- streaming detokenization ------------------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int], **options) -> list[str]:
    stream = StreamingDetokenizer(tokenizer, **options)
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_streaming_concatenation_equals_decode(pair, skip):
    ours, _ = pair
    ids = [i for row in ours(CORPUS + [DOCUMENT])["input_ids"] for i in row]
    stream = StreamingDetokenizer(ours, skip_special_tokens=skip)
    decoded = []
    original = stream._decode
    stream._decode = lambda window, **kw: decoded.append(len(window)) or original(window, **kw)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in chunk for chunk in chunks)  # the corpus has none: no broken character emitted
    assert sum(decoded) < 8 * len(ids)  # each step decodes a short window, not the whole stream


@pytest.mark.parametrize("name", NAMES)
def test_streaming_holds_back_partial_characters(name):
    tok = AutoTokenizer.from_pretrained(FIXTURES / name)
    ids = tok.encode("\U0001d518\U0001f468\u200d\U0001f469")
    pieces = [tok.decode([i]) for i in ids]
    assert any(piece.endswith("\ufffd") for piece in pieces)  # some tokens are fragments of a character
    chunks = _stream(tok, ids)
    assert "".join(chunks) == "\U0001d518\U0001f468\u200d\U0001f469"
    assert all("\ufffd" not in chunk for chunk in chunks)
    # A stream cut inside a character ends with the same replacement character as decode.
    cut = next(i for i, piece in enumerate(pieces) if piece.endswith("\ufffd")) + 1
    chunks = _stream(tok, ids[:cut])
    assert chunks[-1].endswith("\ufffd") and "".join(chunks) == tok.decode(ids[:cut])


def test_streaming_and_decode_with_clean_up_match_reference(tmp_path):
    # Clean-up applies to non-BPE tokenizers; a word-level one whose text joins tokens with spaces.
    words = [
        "[UNK]",
        "<eos>",
        "x",
        "do",
        "'",
        "s",
        "m",
        "n't",
        "n",
        "t",
        "ve",
        "re",
        "v",
        "r",
        ".",
        ",",
        "?",
        "!",
    ]
    words += ["'s", "'m", "'ve", "'re", "a", "rn"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<eos>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
    config |= {"unk_token": "[UNK]", "eos_token": "<eos>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = AutoTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(2)
    ids = [rng.randrange(1, len(words)) for _ in range(3000)]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) != ours.decode(
            ids, clean_up_tokenization_spaces=False
        )
        assert "".join(_stream(ours, ids, skip_special_tokens=skip)) == ours.decode(
            ids, skip_special_tokens=skip
        )
    raw = _stream(ours, ids, clean_up_tokenization_spaces=False)
    assert "".join(raw) == ours.decode(ids, clean_up_tokenization_spaces=False)


# --- tokens and offsets ------------------------------------------------------------------------------------


def test_tokenize_and_convert_ids_to_tokens_match_reference(pair):
    ours, ref = pair
    for text in CORPUS:
        for special in (False, True):
            assert ours.tokenize(text, add_special_tokens=special) == ref.tokenize(
                text, add_special_tokens=special
            )
        ids = ref(text)["input_ids"]
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        if ids:  # one id gives one token string
            assert ours.convert_ids_to_tokens(ids[0]) == ref.convert_ids_to_tokens(ids[0])
    with pytest.raises(TypeError, match="tokenize takes a string"):
        ours.tokenize(["a", "b"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_offsets_mapping_matches_reference(padded_pair, side):
    ours, ref = padded_pair
    ours.padding_side = ref.padding_side = side
    texts = CORPUS[:4]
    for options in (
        {},
        {"padding": True},
        {"padding": True, "return_tensors": "pt"},
        {"truncation": True, "max_length": 5},
    ):
        mine = ours(texts, return_offsets_mapping=True, **options)
        theirs = ref(texts, return_offsets_mapping=True, **options)
        if options.get("return_tensors") == "pt":
            assert torch.equal(mine["offset_mapping"], theirs["offset_mapping"])
            assert torch.equal(mine["input_ids"], theirs["input_ids"])
        else:
            assert mine["offset_mapping"] == [list(map(tuple, row)) for row in theirs["offset_mapping"]]
            assert mine["input_ids"] == theirs["input_ids"]
    one = ours(CORPUS[2], return_offsets_mapping=True)["offset_mapping"]
    assert one == ref(CORPUS[2], return_offsets_mapping=True)["offset_mapping"]
