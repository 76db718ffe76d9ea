"""The reference's tokenizer interface beyond the basics, against the reference on the two fixture tokenizers.

What data collators, lm-evaluation-harness and peft/TRL scripts call: `from_pretrained` options, the call's
options (pairs, words, masks, lengths, per-call padding side, `pad_to_multiple_of`, NumPy arrays), `pad`,
the encoding's maps between characters, words and tokens, and `transformers`' own data collators run on
this tokenizer. Each output is compared with the reference's: keys in order, types, dtypes and values.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stablelm.tokenizer import AutoTokenizer, BatchEncoding

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["gpt-neox-20b", "cl100k-dolma2"]
TEXTS = [
    "The weather is always wonderful",
    "Hello, world! It's a test: don't panic; we're fine.",
    "Special tokens in text: <|endoftext|>Hello<|endoftext|> <|padding|>",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059 \U0001f600 caf\u00e9",
    "",
    "    leading and trailing spaces    ",
    "a" * 60 + " " + "ab" * 20,
]
PAIRS = [
    "world",
    "",
    "And a second text, longer than the first one by far.",
    "x",
    "y z",
    "q",
    "\u00e9t\u00e9",
]
WORDS = [["Hello", "world", "!"], ["caf\u00e9", "au", "lait"], [], ["a" * 30, "b"]]


def _checkpoint(tmp_path: Path, name: str) -> Path:
    """The fixture's files with a StableLM config.json, as the reference sees a hub checkpoint."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "stablelm"}))
    return folder


@pytest.fixture(scope="module", params=NAMES)
def folder(request, tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)


@pytest.fixture(scope="module")
def loaded(folder):
    """(ours, reference) with the pad token set to eos, as fine-tuning scripts set it."""
    ours, ref = AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    ours.pad_token, ref.pad_token = ours.eos_token, ref.eos_token
    return ours, ref


@pytest.fixture
def pair(loaded):
    ours, ref = loaded
    yield ours, ref
    ours.padding_side = ref.padding_side = "right"
    ours.truncation_side = ref.truncation_side = "right"


@pytest.fixture(scope="module")
def with_bos_eos(folder):
    """A pair whose post-processor adds bos and eos (one token before and after each text)."""
    options = {"add_bos_token": True, "add_eos_token": True}
    ours = AutoTokenizer.from_pretrained(folder, **options)
    ref = transformers.AutoTokenizer.from_pretrained(folder, **options)
    ours.pad_token, ref.pad_token = ours.eos_token, ref.eos_token
    return ours, ref


def _same(ours, ref) -> None:
    """The same keys in the same order, and values of the same type, dtype, shape and content."""
    assert list(ours.keys()) == list(ref.keys())
    for key in ref.keys():
        _same_value(ours[key], ref[key], key)


def _same_value(a, b, key: str) -> None:
    assert type(a) is type(b), (key, type(a), type(b))
    if isinstance(b, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        assert torch.equal(a, b), key
    elif isinstance(b, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        if b.dtype == object:  # rows of different lengths: an array of arrays
            for row_a, row_b in zip(a, b, strict=True):
                _same_value(row_a, row_b, key)
        else:
            assert np.array_equal(a, b), key
    else:
        assert a == b, key


def _both(ours, ref, *args, **kwargs):
    """Call both with the same arguments; they return the same, or both raise (ours a clear ValueError)."""
    try:
        expected = ref(*copy.deepcopy(args), **kwargs)  # the reference's pad changes a dict it is given
    except Exception as err:  # the reference raises bare Exceptions from `tokenizers` for some
        with pytest.raises((ValueError, TypeError)):
            ours(*args, **kwargs)
        return err
    got = ours(*args, **kwargs)
    _same(got, expected)
    return got


# --- from_pretrained -----------------------------------------------------------------------------------


def test_from_pretrained_options_match_reference(folder):
    options = {
        "use_fast": True,
        "pad_token": "<|padding|>",
        "eos_token": "<|my_eos|>",
        "padding_side": "left",
        "truncation_side": "left",
        "model_max_length": 7,
    }
    ours = AutoTokenizer.from_pretrained(folder, **options)
    ref = transformers.AutoTokenizer.from_pretrained(folder, **options)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.pad_token_id, ours.eos_token_id, len(ours)) == (ref.pad_token_id, ref.eos_token_id, len(ref))
    assert (ours.padding_side, ours.truncation_side, ours.model_max_length) == ("left", "left", 7)
    assert ours.all_special_ids == ref.all_special_ids
    _same(ours(TEXTS, padding=True, truncation=True), ref(TEXTS, padding=True, truncation=True))
    _same(ours(TEXTS, padding="max_length"), ref(TEXTS, padding="max_length"))
    # use_fast=False: the reference falls back to the tokenizers one for these checkpoints, and so do we.
    slow = transformers.AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert slow.is_fast and AutoTokenizer.from_pretrained(folder, use_fast=False).is_fast
    # New tokens get ids in the order of the names (bos, eos, unk, sep, pad, cls, mask), whatever the order given.
    news = {"pad_token": "<|p2|>", "mask_token": "<|m|>", "bos_token": "<|b2|>", "sep_token": "<|s|>"}
    ours = AutoTokenizer.from_pretrained(folder, **news)
    ref = transformers.AutoTokenizer.from_pretrained(folder, **news)
    assert ours.special_tokens_map == ref.special_tokens_map and ours.all_special_ids == ref.all_special_ids
    assert len(ours) == len(ref)
    ours = AutoTokenizer.from_pretrained(folder, pad_token=None)
    ref = transformers.AutoTokenizer.from_pretrained(folder, pad_token=None)
    assert ours.pad_token is ref.pad_token is None


def test_from_pretrained_refuses_bad_options_naming_them(folder):
    with pytest.raises(TypeError, match="pad_token must be a token string"):
        AutoTokenizer.from_pretrained(folder, pad_token=5)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', not 'up'"):
        AutoTokenizer.from_pretrained(folder, padding_side="up")
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
        AutoTokenizer.from_pretrained(folder, truncation_side="middle")
    with pytest.raises(ValueError, match="model_max_length must be a positive integer, not 0"):
        AutoTokenizer.from_pretrained(folder, model_max_length=0)


# --- the call's options --------------------------------------------------------------------------------

CALL_CASES = [
    {"return_attention_mask": False},
    {"return_attention_mask": True, "padding": True},
    {"return_attention_mask": False, "padding": True, "return_tensors": "pt"},
    {"padding_side": "left", "padding": True},
    {"padding_side": "right", "padding": True, "return_tensors": "pt"},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": "longest", "pad_to_multiple_of": 8, "return_tensors": "np"},
    {"padding": "max_length", "max_length": 20, "pad_to_multiple_of": 8, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 16, "truncation": True, "pad_to_multiple_of": 8},
    {"padding": True, "truncation": True, "max_length": 12, "return_tensors": "np"},
    {"pad_to_multiple_of": 8},  # no padding: ignored
    {"return_tensors": "np"},  # rows of different lengths: an object array of rows, as in the reference
    {"return_length": True},
    {"return_length": True, "padding": True, "pad_to_multiple_of": 4, "return_tensors": "pt"},
    {"return_token_type_ids": True, "padding": True},
    {"return_token_type_ids": False},
    {"return_special_tokens_mask": True, "padding": True, "padding_side": "left"},
    {
        "return_special_tokens_mask": True,
        "return_token_type_ids": True,
        "return_tensors": "np",
        "padding": True,
    },
    {"return_offsets_mapping": True, "padding": True, "return_tensors": "np"},
    {"truncation": "longest_first", "max_length": 5},
    {"truncation": "only_first", "max_length": 5, "return_length": True},
    {"truncation": "only_second", "max_length": 500},  # nothing to cut: no error
    {"truncation": "only_second", "max_length": 3},  # a cut without a second text: an error in both
    {"truncation": "do_not_truncate", "max_length": 3},
    {"add_special_tokens": False, "return_special_tokens_mask": True, "padding": True},
]


@pytest.mark.parametrize("case", CALL_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()))
@pytest.mark.parametrize("bos_eos", [False, True], ids=["plain", "bos_eos"])
def test_call_options_match_reference(pair, with_bos_eos, case, bos_eos):
    ours, ref = with_bos_eos if bos_eos else pair
    for side in ("right", "left"):
        ours.truncation_side = ref.truncation_side = side
        _both(ours, ref, TEXTS, **case)
        _both(ours, ref, TEXTS[1], **case)
        _both(ours, ref, TEXTS[4], **case)
    ours.truncation_side = ref.truncation_side = "right"


def test_single_text_tensors_keep_a_batch_dimension(pair):
    ours, ref = pair
    for kind in ("pt", "np"):
        got = _both(ours, ref, TEXTS[0], return_tensors=kind, return_length=True, return_offsets_mapping=True)
        assert got["input_ids"].shape == (1, 5) and got["length"].shape == (1,)
        _both(ours, ref, "", return_tensors=kind, return_offsets_mapping=True)  # (1, 0), int64


PAIR_CASES = [
    {},
    {"return_token_type_ids": True, "return_special_tokens_mask": True},
    {"return_offsets_mapping": True, "return_token_type_ids": True},
    {"padding": True, "return_token_type_ids": True, "return_tensors": "pt"},
    {"add_special_tokens": False, "return_token_type_ids": True},
    {"truncation": True, "max_length": 9, "return_token_type_ids": True},
    {"truncation": "longest_first", "max_length": 6, "return_offsets_mapping": True},
    {"truncation": "only_first", "max_length": 12, "return_token_type_ids": True},
    {"truncation": "only_second", "max_length": 12, "return_special_tokens_mask": True},
    {"truncation": "only_first", "max_length": 4},  # first texts too short to cut enough: an error in both
    {"truncation": "longest_first", "max_length": 5, "padding": "max_length"},
    {"truncation": True, "max_length": 8, "padding": True, "padding_side": "left", "return_tensors": "np"},
    {"truncation": True, "max_length": 10, "add_special_tokens": False, "return_token_type_ids": True},
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()))
@pytest.mark.parametrize("bos_eos", [False, True], ids=["plain", "bos_eos"])
def test_text_pairs_match_reference(pair, with_bos_eos, case, bos_eos):
    ours, ref = with_bos_eos if bos_eos else pair
    for side in ("right", "left"):
        ours.truncation_side = ref.truncation_side = side
        _both(ours, ref, TEXTS, PAIRS, **case)
        _both(ours, ref, TEXTS[1], PAIRS[2], **case)
    ours.truncation_side = ref.truncation_side = "right"


def test_pair_positional_and_empty_pair_match_reference(pair):
    ours, ref = pair
    _same(ours("hello", "world"), ref("hello", "world"))
    _same(ours("hello", ""), ref("hello", ""))  # an empty pair is no pair, in both
    _same(ours("hello", text_pair="world"), ref("hello", text_pair="world"))
    assert ours.encode("hello", "world") == ref.encode("hello", "world")


@pytest.mark.parametrize(
    "case", [{}, {"padding": True, "return_tensors": "pt"}, {"truncation": True, "max_length": 3}]
)
def test_split_into_words_matches_reference(pair, case):
    ours, ref = pair
    _same(ours(WORDS, is_split_into_words=True, **case), ref(WORDS, is_split_into_words=True, **case))
    _same(ours(WORDS[0], is_split_into_words=True, **case), ref(WORDS[0], is_split_into_words=True, **case))
    options = {"is_split_into_words": True, "return_token_type_ids": True, **case}
    _same(ours(WORDS, WORDS[::-1], **options), ref(WORDS, WORDS[::-1], **options))
    got, expected = ours(WORDS, is_split_into_words=True), ref(WORDS, is_split_into_words=True)
    for i in range(len(WORDS)):
        assert got.word_ids(i) == expected.word_ids(i)


def test_call_errors(pair):
    ours, ref = pair
    with pytest.raises(TypeError, match="`text_pair` must be a list or tuple with the same length as `text`"):
        ours(["a", "b"], "c")
    with pytest.raises(
        ValueError, match="batch length of `text`: 2 does not match batch length of `text_pair`: 1"
    ):
        ours(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="text_pair must be of the same form as text"):
        ours("a", ["b"])
    with pytest.raises(TypeError, match=r"text must be a list of words \(strings\) or a list of such lists"):
        ours("abc", is_split_into_words=True)
    with pytest.raises(TypeError, match="text must be a list of words"):
        ours(["ab", 3], is_split_into_words=True)
    with pytest.raises(ValueError, match="padding_side must be 'left', 'right' or None, not 'up'"):
        ours(["a", "bb"], padding=True, padding_side="up")
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or an integer >= 1, not 0"):
        ours(["a"], padding=True, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="max_length must be None or an integer >= 0, not -1"):
        ours("a", max_length=-1)
    with pytest.raises(
        ValueError, match=r"truncation length \(8\) is not a multiple of pad_to_multiple_of \(3\)"
    ):
        ours(["a"], padding="max_length", max_length=8, truncation=True, pad_to_multiple_of=3)
    with pytest.raises(ValueError):  # the same error in the reference
        ref(["a"], padding="max_length", max_length=8, truncation=True, pad_to_multiple_of=3)
    with pytest.raises(ValueError, match="truncation='only_second' cuts the second text of pairs"):
        ours(TEXTS[0], truncation="only_second", max_length=2)
    with pytest.raises(ValueError, match="truncation='only_first' cannot fit max_length=2"):
        ours("a", "b c d e f", truncation="only_first", max_length=2)


# --- the encoding's maps -------------------------------------------------------------------------------


def _try(method, *args):
    """What a call returns, or the type of error it raises (the same in both is part of matching)."""
    try:
        return method(*args)
    except Exception as err:
        return type(err).__name__


def _maps(encoding, rows: int, text_lengths: list[int]) -> list:
    """Everything the encoding maps, for each row: tokens, words, sequences and their spans."""
    out = [encoding.n_sequences, encoding.is_fast]
    for i in range(rows):
        tokens = encoding.tokens(i)
        out += [tokens, encoding.word_ids(i), encoding.sequence_ids(i)]
        for method in (encoding.token_to_chars, encoding.token_to_word, encoding.token_to_sequence):
            out += [_try(method, i, t) for t in range(len(tokens))]
        for method in (encoding.char_to_token, encoding.char_to_word):
            out += [_try(method, i, c) for c in range(text_lengths[i])]
        for w in dict.fromkeys(encoding.word_ids(i)):
            if w is not None:
                out += [_try(encoding.word_to_tokens, i, w), _try(encoding.word_to_chars, i, w)]
    out += [
        encoding.tokens(),
        encoding.word_ids(),
        _try(encoding.char_to_token, 0),
        encoding.token_to_chars(0),
    ]
    return out


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"padding": True, "padding_side": "left"},
        {"padding": True, "return_tensors": "pt", "return_offsets_mapping": True},
        {"truncation": True, "max_length": 8, "padding": "max_length", "pad_to_multiple_of": 8},
        {"truncation": True, "max_length": 5, "return_offsets_mapping": True},
    ],
)
def test_encoding_maps_match_reference(pair, with_bos_eos, case):
    for ours, ref in (pair, with_bos_eos):
        texts = [text for text in TEXTS if text]
        got, expected = ours(texts, **case), ref(texts, **case)
        assert _maps(got, len(texts), list(map(len, texts))) == _maps(
            expected, len(texts), list(map(len, texts))
        )
        assert [e.ids for e in got.encodings] == [e.ids for e in expected.encodings]
        assert got[0].ids == expected[0].ids
        assert [e.ids for e in got[1:3]] == [e.ids for e in expected[1:3]]
        single = ours(texts[1], **case)
        assert _maps(single, 1, [len(texts[1])]) == _maps(ref(texts[1], **case), 1, [len(texts[1])])
        # Pairs: the sequence ids and the second text's characters, also when cut.
        for options in ({}, {"truncation": True, "max_length": 7}):
            got, expected = ours(texts[:3], PAIRS[:3], **options), ref(texts[:3], PAIRS[:3], **options)
            assert _maps(got, 3, [len(t) for t in texts[:3]]) == _maps(
                expected, 3, [len(t) for t in texts[:3]]
            )
            for i in range(3):
                second = [got.char_to_token(i, c, sequence_index=1) for c in range(len(PAIRS[i]))]
                assert second == [
                    expected.char_to_token(i, c, sequence_index=1) for c in range(len(PAIRS[i]))
                ]


def test_batch_encoding_pickles_and_needs_encodings_for_maps(pair):
    ours, _ = pair
    encoding = ours(TEXTS[:2], padding=True, return_tensors="pt")
    again = pickle.loads(pickle.dumps(encoding))  # as DataLoader workers send batches
    assert isinstance(again, BatchEncoding) and again.keys() == encoding.keys()
    assert torch.equal(again.input_ids, encoding.input_ids)
    with pytest.raises(ValueError, match=r"tokens\(\) needs the tokenizer's encodings"):
        again.tokens()
    encoding.tokens()  # made now, so they travel with it
    assert pickle.loads(pickle.dumps(encoding)).tokens(1) == encoding.tokens(1)
    padded = ours.pad({"input_ids": [[1, 2], [3]]})
    assert padded.encodings is None and not padded.is_fast
    assert (
        padded[1:]
        == transformers.BatchEncoding(dict(padded))[1:]
        == {"input_ids": [[3, ours.pad_token_id]], "attention_mask": [[1, 0]]}
    )


# --- pad -----------------------------------------------------------------------------------------------


def _features(ours, *, tensors: bool = False, labels: str | None = None, extra: bool = False) -> list[dict]:
    encoded = ours(TEXTS, return_special_tokens_mask=extra, return_token_type_ids=extra)
    features = [
        dict(zip(encoded.keys(), values, strict=True)) for values in zip(*encoded.values(), strict=True)
    ]
    for i, feature in enumerate(features):
        if labels == "same":
            feature["labels"] = [i, i + 1]
        elif labels == "ragged":
            feature["labels"] = list(feature["input_ids"])
        elif labels == "scalar":
            feature["label"] = i % 2
        if tensors:
            feature.update({key: torch.tensor(value) for key, value in feature.items()})
    return features


PAD_CASES = [
    {},
    {"padding": "longest", "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 40, "return_tensors": "np"},
    {"padding": "max_length"},  # model_max_length
    {"padding": True, "pad_to_multiple_of": 8, "return_tensors": "pt"},
    {"padding": False, "return_attention_mask": True},
    {"padding": True, "return_attention_mask": False},
    {"padding": True, "padding_side": "left", "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 3},  # rows longer than max_length are left as they are
]


@pytest.mark.parametrize("case", PAD_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()))
def test_pad_matches_reference(pair, case):
    ours, ref = pair
    for options in ({}, {"extra": True}, {"labels": "same"}, {"labels": "scalar"}, {"labels": "ragged"}):
        for tensors in (False, True):
            features = _features(ours, tensors=tensors, **options)
            _both(ours.pad, ref.pad, features, **case)
            if not tensors:  # a dict of lists, and one example
                columns = {key: [f[key] for f in features] for key in features[0]}
                _both(ours.pad, ref.pad, columns, **case)
                _both(ours.pad, ref.pad, dict(features[1]), **case)
    batch = ours(TEXTS, padding=True, return_tensors="np")
    _both(ours.pad, ref.pad, dict(batch), **case)  # arrays stay arrays


def test_pad_takes_one_example_of_arrays(pair):
    # The reference refuses this ("type of 12 unknown: numpy.int64") although it takes a batch of them.
    ours, _ = pair
    padded = ours.pad({"input_ids": np.array([5, 6, 7])}, padding="max_length", max_length=4)
    assert padded["input_ids"].tolist() == [5, 6, 7, ours.pad_token_id]
    assert padded["attention_mask"].dtype == np.int64 and padded["attention_mask"].tolist() == [1, 1, 1, 0]


def test_pad_errors(pair):
    ours, ref = pair
    with pytest.raises(ValueError, match="pad needs `input_ids`"):
        ours.pad([{"attention_mask": [1]}])
    with pytest.raises(ValueError, match=r"example 1 is dict with the keys \['input_ids'\]"):
        ours.pad([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}])
    with pytest.raises(TypeError, match="pad takes an encoding"):
        ours.pad("hello")
    with pytest.raises(ValueError, match="padding must be one of"):
        ours.pad({"input_ids": [[1], [2, 3]]}, padding="sideways")
    with pytest.raises(ValueError, match="pad takes ids as Python ints, torch tensors or NumPy arrays"):
        ours.pad({"input_ids": ["a", "b"]})
    with pytest.raises(ValueError, match="pad needs the same number of rows in every field"):
        ours.pad({"input_ids": [[1], [2, 3]], "attention_mask": [[1]]})
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or an integer >= 1, not 0"):
        ours.pad({"input_ids": [[1], [2, 3]]}, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="padding_side must be 'left', 'right' or None, not 'up'"):
        ours.pad({"input_ids": [[1], [2, 3]]}, padding_side="up")
    with pytest.raises(ValueError, match="return_tensors must be None, 'pt' or 'np', not 'tf'"):
        ours.pad({"input_ids": [[1], [2, 3]]}, return_tensors="tf")
    ragged = _features(ours, labels="ragged")
    with pytest.raises(ValueError, match="Cannot make one tensor of `labels`"):
        ours.pad(ragged, return_tensors="pt")
    with pytest.raises(ValueError):  # the same error in the reference
        ref.pad(ragged, return_tensors="pt")
    saved = ours.pad_token
    ours.pad_token = None
    try:
        with pytest.raises(ValueError, match="no pad token"):
            ours.pad({"input_ids": [[1], [2, 3]]})
        assert ours.pad({"input_ids": []}) == {"input_ids": []}  # nothing to pad: no error, as the reference
    finally:
        ours.pad_token = saved


def test_data_collators_match_reference(pair):
    ours, ref = pair
    for collator_class, options in [
        (transformers.DataCollatorWithPadding, {}),
        (transformers.DataCollatorWithPadding, {"pad_to_multiple_of": 8, "return_tensors": "np"}),
        (transformers.DataCollatorWithPadding, {"padding": "max_length", "max_length": 48}),
        (transformers.DataCollatorForLanguageModeling, {"mlm": False}),
        (transformers.DataCollatorForLanguageModeling, {"mlm": False, "pad_to_multiple_of": 8}),
    ]:
        for labels in (None, "scalar"):
            for tensors in (False, True):
                features = _features(ours, tensors=tensors, labels=labels)
                got = collator_class(tokenizer=ours, **options)(features)
                expected = collator_class(tokenizer=ref, **options)(
                    _features(ours, tensors=tensors, labels=labels)
                )
                _same(got, expected)
        # lists of ids, which DataCollatorForLanguageModeling pads with the tokenizer's pad token and side
        if collator_class is transformers.DataCollatorForLanguageModeling:
            for side in ("right", "left"):
                ours.padding_side = ref.padding_side = side
                ids = ours([text for text in TEXTS if text])["input_ids"]  # the reference fails on empty rows
                _same(
                    collator_class(tokenizer=ours, **options)(ids),
                    collator_class(tokenizer=ref, **options)(ids),
                )
            ours.padding_side = ref.padding_side = "right"


# --- decoding and token strings ------------------------------------------------------------------------


def test_decode_options_and_token_strings_match_reference(pair, with_bos_eos):
    ours, ref = pair
    assert ours.is_fast and ref.is_fast
    for text in TEXTS:
        tokens = ref.tokenize(text)
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)
    ids = with_bos_eos[0](TEXTS[2])["input_ids"]
    for options in (
        {"spaces_between_special_tokens": False},
        {"spaces_between_special_tokens": True, "skip_special_tokens": True},
    ):
        assert ours.decode(ids, **options) == ref.decode(ids, **options)
        assert ours.batch_decode([ids, ids[:3]], **options) == ref.batch_decode([ids, ids[:3]], **options)
    with pytest.raises(TypeError, match="convert_tokens_to_string takes a list of token strings"):
        ours.convert_tokens_to_string("abc")


def test_chat_template_arrays_match_reference(pair):
    ours, ref = pair
    chats = [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "A longer question?"}]]
    for options in (
        {"return_tensors": "np", "padding": True},
        {"return_tensors": "np", "return_dict": False},
    ):
        got, expected = ours.apply_chat_template(chats, **options), ref.apply_chat_template(chats, **options)
        if isinstance(expected, np.ndarray):
            _same_value(got, expected, "input_ids")
        else:
            _same(got, expected)


def test_from_pretrained_options_example_code_passes(folder):
    """`model_max_length=None` is no limit; `additional_special_tokens`, `clean_up_tokenization_spaces` and
    `legacy` are taken as the reference takes them."""
    long_text = "word " * 5000
    kw = dict(model_max_length=None, additional_special_tokens=["<x1>"], clean_up_tokenization_spaces=False)
    ours = AutoTokenizer.from_pretrained(folder, legacy=False, **kw)
    ref = transformers.AutoTokenizer.from_pretrained(folder, legacy=False, **kw)
    assert ours.model_max_length == ref.model_max_length
    _same(ours(long_text, truncation=True), ref(long_text, truncation=True))
    assert len(ours) == len(ref) and "<x1>" in ours.all_special_tokens and "<x1>" in ref.all_special_tokens
    _same(ours("a <x1> b"), ref("a <x1> b"))
    assert ours.clean_up_tokenization_spaces is ref.clean_up_tokenization_spaces is False


def test_stride_verbose_and_overflow_at_their_defaults_are_accepted(pair):
    ours, ref = pair
    kw = dict(stride=0, verbose=False, return_overflowing_tokens=False)
    _same(ours(TEXTS[:2], **kw), ref(TEXTS[:2], **kw))
    for bad in (dict(stride=2), dict(return_overflowing_tokens=True)):
        with pytest.raises(ValueError, match="overflowing tokens are not made"):
            ours(TEXTS[0], truncation=True, max_length=4, **bad)
