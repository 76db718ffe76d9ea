"""Chat fine-tuning: conversations rendered with the chat template, loss masks equal to the reference's,
packed documents kept apart, token-weighted losses, and clear errors for rows that are not conversations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_pair, tiny_config, transformers
from training_fixtures import Interrupt, stop_at_save, tiny_causal_lm, write_jsonl

from stablelm import AutoTokenizer, StableLmForCausalLM
from stablelm.cli import main
from stablelm.tokenizer.generation_spans import render_with_generation_spans
from stablelm.training import Trainer, TrainingArguments
from stablelm.training.chat import (
    IGNORE_INDEX,
    LabelledBlocks,
    encode_conversation,
    pack_conversations,
    read_conversations,
)
from stablelm.training.checkpoints import list_checkpoints

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")
DEMO = Path(__file__).parents[1] / "stablelm" / "assets" / "demo"
# ChatML with the assistant's text (and its end of turn) in {% generation %} blocks, as TRL's training
# templates mark it.
MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3, spelled out?"},
        {"role": "assistant", "content": "Six, my friend."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "assistant", "content": "I open the conversation."}, {"role": "user", "content": "Fine."}],
]


def _predicted(labels: list[int]) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in labels]


# ---- masks against the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("conversation", CONVERSATIONS[:2], ids=["multi-turn", "one-turn"])
def test_generation_blocks_give_the_references_assistant_mask(conversation):
    ours = AutoTokenizer.from_pretrained(FIXTURES / "cl100k-dolma2")
    ours.chat_template = MARKED
    reference = transformers.AutoTokenizer.from_pretrained(FIXTURES / "cl100k-dolma2")
    out = reference.apply_chat_template(
        conversation,
        chat_template=MARKED,
        return_assistant_tokens_mask=True,
        return_dict=True,
        tokenize=True,
    )
    ids, labels = encode_conversation(ours, conversation)
    assert ids == out["input_ids"]
    expected = list(out["assistant_masks"])
    expected[0] = 0  # the first token is never a label
    assert _predicted(labels) == expected and sum(expected) > 4
    assert [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX] == [
        i for i, keep in zip(ids, expected, strict=True) if keep
    ]
    text, _ = render_with_generation_spans(MARKED, conversation)
    assert text == reference.apply_chat_template(conversation, chat_template=MARKED, tokenize=False)


def test_apply_chat_template_returns_the_references_assistant_masks():
    ours = AutoTokenizer.from_pretrained(FIXTURES / "cl100k-dolma2")
    reference = transformers.AutoTokenizer.from_pretrained(FIXTURES / "cl100k-dolma2")
    batch = CONVERSATIONS[:2]
    for conversations, tensors in ((batch[0], None), (batch, None), (batch[1:], "pt")):
        kwargs = dict(
            chat_template=MARKED, return_assistant_tokens_mask=True, return_dict=True, return_tensors=tensors
        )
        got, expected = (
            ours.apply_chat_template(conversations, **kwargs),
            reference.apply_chat_template(conversations, **kwargs),
        )
        if tensors:
            assert torch.equal(got["assistant_masks"], expected["assistant_masks"])
            assert torch.equal(got["input_ids"], expected["input_ids"])
        else:
            assert got["assistant_masks"] == list(expected["assistant_masks"])
            assert got["input_ids"] == list(expected["input_ids"])
    with pytest.warns(UserWarning, match="no {% generation %} blocks"):
        plain = ours.apply_chat_template(batch[1], return_assistant_tokens_mask=True, return_dict=True)
    assert plain["assistant_masks"] == [0] * len(plain["input_ids"])
    with pytest.raises(ValueError, match="requires `return_dict=True`"):
        ours.apply_chat_template(
            batch[1], chat_template=MARKED, return_assistant_tokens_mask=True, return_dict=False
        )
    with pytest.raises(ValueError, match="without padding and truncation"):
        ours.apply_chat_template(
            batch, chat_template=MARKED, return_assistant_tokens_mask=True, return_dict=True, padding=True
        )


def _reference_incremental_mask(reference, conversation) -> tuple[list[int], list[int]]:
    """The assistant mask by rendering turn by turn with the reference: each assistant message is what
    rendering up to it adds to rendering the turns before it with the generation prompt."""
    render = reference.apply_chat_template
    text = render(conversation, tokenize=False)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        if index:
            before = render(conversation[:index], tokenize=False, add_generation_prompt=True)
        else:  # the reference renders no empty conversation: the generation prompt alone
            probe = [{"role": "user", "content": ""}]
            plain = render(probe, tokenize=False)
            before = render(probe, tokenize=False, add_generation_prompt=True)[len(plain) :]
        upto = render(conversation[: index + 1], tokenize=False)
        assert upto.startswith(before) and text.startswith(upto)
        spans.append((len(before), len(upto)))
    encoding = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start < end_span and end > start_span for start_span, end_span in spans))
        for start, end in encoding["offset_mapping"]
    ]
    return encoding["input_ids"], mask


@pytest.mark.parametrize("folder", [FIXTURES / "gpt-neox-20b", FIXTURES / "cl100k-dolma2", DEMO])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["multi-turn", "one-turn", "assistant-first"])
def test_templates_without_markers_give_the_references_incremental_mask(folder, conversation):
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ids, mask = _reference_incremental_mask(reference, conversation)
    ours, labels = encode_conversation(AutoTokenizer.from_pretrained(folder), conversation)
    mask[0] = 0
    assert ours == ids
    assert _predicted(labels) == mask and sum(mask) > 2
    # the assistant's replies are learned; the users' turns are not
    learned = reference.decode([i for i, m in zip(ids, mask, strict=True) if m])
    for message in conversation:
        assert (message["content"] in learned) == (message["role"] == "assistant"), (message, learned)


def test_loss_on_all_labels_every_token_but_the_first():
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    ids, labels = encode_conversation(tokenizer, CONVERSATIONS[0], loss_on="all")
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]
    with pytest.raises(ValueError, match="loss_on must be one of"):
        encode_conversation(tokenizer, CONVERSATIONS[0], loss_on="user")


# ---- packing ---------------------------------------------------------------------------------------------
def test_conversations_pack_whole_with_positions_restarting():
    docs = [
        ([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5]),
        ([6, 7, 8], [-100, 7, -100]),
        ([9, 10], [-100, -100]),  # nothing to learn: its block is left out
        (list(range(11, 23)), [-100] + list(range(12, 23))),  # longer than a block: cut
        ([30, 31, 32, 33], [-100, 31, 32, 33]),
    ]
    blocks, report = pack_conversations(docs, block_size=8, pad_token_id=0)
    assert (report.truncated, report.dropped) == (1, 0)
    rows = {tuple(row) for row in blocks.input_ids.tolist()}
    # best fit decreasing: 8 (cut), 5 + 3, 4 + 2 (+ 2 padding)
    assert rows == {tuple(range(11, 19)), (1, 2, 3, 4, 5, 6, 7, 8), (30, 31, 32, 33, 9, 10, 0, 0)}
    for ids, labels, positions in zip(blocks.input_ids, blocks.labels, blocks.position_ids, strict=True):
        if ids[0] == 1:
            assert positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
            assert labels.tolist() == [-100, 2, 3, -100, 5, -100, 7, -100]
        if ids[0] == 30:
            assert positions.tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
            assert labels.tolist() == [-100, 31, 32, 33, -100, -100, -100, -100]
    alone, report = pack_conversations(docs[2:3] + docs[1:2], block_size=4, pad_token_id=0)
    assert alone.input_ids.tolist() == [[6, 7, 8, 0]] and report.dropped == 1  # [9, 10] fit only alone
    with pytest.raises(ValueError, match="No conversation has a token to learn"):
        pack_conversations(docs[2:3], block_size=4, pad_token_id=0)


def test_packed_documents_do_not_attend_across_the_boundary():
    config = tiny_config(max_position_embeddings=32)
    ours, reference = make_pair(config)
    first, second = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=positions, use_cache=False).logits
        alone = ours(second, use_cache=False).logits
        crossing = ours(ids, use_cache=False).logits
        expected = reference(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(packed[:, 7:], alone, atol=1e-5, rtol=0)
    assert (crossing[:, 7:] - alone).abs().max() > 1e-2  # attending across would show
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


def test_packed_documents_stay_apart_in_a_compiled_forward():
    ours, _ = make_pair(tiny_config(max_position_embeddings=32))
    ids = torch.randint(0, 128, (1, 16))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]

    def forward(ids, positions):
        return ours(ids, position_ids=positions, use_cache=False).logits

    # dynamo traces the mask's construction (no branch on the positions' values); eager kernels keep it quick
    compiled = torch.compile(forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, positions), forward(ids, positions), atol=1e-6, rtol=0)


# ---- the trainer on labelled blocks ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_blocks():
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    docs = [encode_conversation(tokenizer, c) for c in CONVERSATIONS * 4]
    return pack_conversations(docs, block_size=48, pad_token_id=tokenizer.pad_token_id)[0]


def _args(out, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=out, max_steps=2, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        warmup_steps=0, save_interval=100, precision="fp32", weight_decay=0.0,
    )  # fmt: skip
    return TrainingArguments(**{**fields, **overrides})


def test_the_loss_is_the_mean_over_labelled_tokens_across_micro_batches(chat_blocks, tmp_path):
    blocks = chat_blocks[torch.tensor([0, 4, 8, 5])]
    counts = blocks.predicted()
    assert len(set(counts.tolist())) > 1  # the blocks hold different numbers of labelled tokens
    accumulated = Trainer(tiny_causal_lm(4096), args=_args(tmp_path / "a", max_steps=1), train_blocks=blocks)
    one_batch = Trainer(
        tiny_causal_lm(4096), args=_args(tmp_path / "b", max_steps=1, batch_size=4, gradient_accumulation_steps=1),
        train_blocks=blocks,
    )  # fmt: skip
    one_batch.order = accumulated.order  # the same four blocks in the same step
    # the step's loss and gradients (before AdamW, whose first step is about lr times the gradient's sign)
    assert accumulated._accumulate_gradients(0) == pytest.approx(one_batch._accumulate_gradients(0), abs=1e-6)
    for (name, p), q in zip(accumulated.model.named_parameters(), one_batch.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    # and it is the mean over each document's labelled tokens, computed one block at a time
    model = tiny_causal_lm(4096)
    total = 0.0
    with torch.no_grad():
        for row in range(4):
            part = blocks[row : row + 1]
            loss = model(
                part.input_ids, labels=part.labels, position_ids=part.position_ids, use_cache=False
            ).loss
            total += loss.item() * int(counts[row])
    trainer = Trainer(model, args=_args(tmp_path / "c"), train_blocks=blocks, eval_blocks=blocks)
    assert trainer.evaluate()[0] == pytest.approx(total / int(counts.sum()), rel=1e-6)


def test_chat_training_resumes_exactly(chat_blocks, tmp_path):
    args = _args(tmp_path, max_steps=4, save_interval=2, save_total_limit=0)
    whole = Trainer(
        tiny_causal_lm(4096), args=_args(tmp_path / "whole", max_steps=4), train_blocks=chat_blocks
    )
    state = whole.train()
    first = Trainer(tiny_causal_lm(4096), args=args, train_blocks=chat_blocks, callback=stop_at_save(2))
    with pytest.raises(Interrupt):
        first.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    resumed = Trainer(tiny_causal_lm(4096, seed=5), args=args, train_blocks=chat_blocks)
    final = resumed.train(resume_from=tmp_path / "checkpoint-2")
    assert final.log_history == state.log_history
    other = LabelledBlocks(chat_blocks.input_ids, chat_blocks.input_ids.clone(), chat_blocks.position_ids)
    with pytest.raises(ValueError, match="train_labels_sum"):
        Trainer(tiny_causal_lm(4096), args=args, train_blocks=other).resume(tmp_path / "checkpoint-2")


# ---- the command ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_causal_lm(4096).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(folder)
    return folder


def _train(base, data, out, *extra) -> list[str]:
    return [
        "train", "--model", str(base), "--data", str(data), "--output-dir", str(out), "--block-size", "48",
        "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "0", "--eval-fraction", "0",
        "--log-interval", "1", *extra,
    ]  # fmt: skip


def test_train_on_chat_data_end_to_end(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 4])
    assert main(_train(base, data, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "12 conversations (loss on assistant tokens)" in err and "step 2/2: loss" in err
    assert StableLmForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == 4096
    args = _train(
        base, data, tmp_path / "all", "--loss-on", "all", "--lora-r", "2", "--eval-fraction", "0.25"
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "(loss on all tokens)" in err and "held out" in err and "held-out loss" in err
    assert (tmp_path / "all" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "is not valid JSON"),
        ({"text": "plain"}, 'has no "messages" list'),
        ({"messages": []}, '"messages" is empty'),
        ({"messages": ["hello"]}, "message 0 is a str, not an object"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "message 0 has role 'robot'; use one of"),
        ({"messages": [{"role": "user", "content": ["a", "b"]}]}, 'has a non-string "content"'),
        ({"messages": [{"role": "user"}]}, 'has no "content"'),
        ({"messages": [{"role": "tool", "content": "x"}]}, "the chat template refused it"),
    ],
    ids=[
        "not-json",
        "no-messages",
        "empty",
        "not-object",
        "bad-role",
        "list-content",
        "no-content",
        "refused",
    ],
)
def test_rows_that_are_not_conversations_name_the_file_and_line(row, message, base, tmp_path, capsys):
    good = {"messages": CONVERSATIONS[1]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, good, row])
    assert main(_train(base, data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert f"{data}:3" in err and message in err and "Traceback" not in err, err
    if message != "the chat template refused it":
        with pytest.raises(ValueError, match=f"{data}:3"):
            read_conversations([data])


def test_chat_data_errors_of_the_command(base, tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[1]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text"}])
    assert main(_train(base, tmp_path, tmp_path / "out")) == 1
    assert "mixes chat conversations" in capsys.readouterr().err
    assert main([*_train(base, chat, tmp_path / "out"), "--eval-data", str(text)]) == 2
    assert "--eval-data must too" in capsys.readouterr().err
    assert main(_train(base, text, tmp_path / "out", "--loss-on", "all")) == 2
    assert "--loss-on is for chat data" in capsys.readouterr().err
    no_template = tmp_path / "no-template"
    tiny_causal_lm(4096).save_pretrained(no_template)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    assert main(_train(no_template, chat, tmp_path / "out")) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err
