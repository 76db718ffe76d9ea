"""Tools built on the reference, run on stablelm's model: peft's LoRA recipe, transformers' pipeline,
lm-evaluation-harness's HFLM. Each result is compared with the same tool on the reference model."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_pair, tiny_config, transformers

import stablelm

peft = pytest.importorskip("peft")


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA's B starts at zero: give it values so that the adapter changes the logits
        for name, p in sorted(wrapped.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return wrapped


def _lora_pair(**config):
    ours, ref = make_pair(tiny_config(**config))
    torch.manual_seed(0)
    ours = _lora(ours)
    torch.manual_seed(0)
    return ours, _lora(ref)


def test_peft_lora_causal_lm_forward_and_generate_equal_the_reference():
    ours, ref = _lora_pair()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mine, theirs = ours(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=0)
    with ours.disable_adapter():  # the adapter is in the path
        assert not torch.equal(mine.logits, ours(input_ids=ids).logits)
    options = dict(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**options), ref.generate(**options))


def test_peft_lora_with_reentrant_checkpointing_trains_as_the_reference():
    ours, ref = _lora_pair()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (ours, ref):
        model.train()
        base = model.get_base_model()
        base.config.hidden_dropout = base.config.attention_dropout = 0.0
        # peft's recipe for frozen (e.g. quantized) bases: reentrant checkpointing needs the embedding's
        # output to require grad, else no gradient reaches the adapters.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_A" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name])


def test_what_lm_evaluation_harness_reads_without_a_tokenizer(tmp_path):
    """HFLM(pretrained=model) loads the tokenizer from `model.name_or_path` with transformers'
    AutoTokenizer, reads `config.vocab_size`, `device`, and calls `eval()` and `tie_weights()`."""
    model = stablelm.StableLmForCausalLM.from_pretrained(stablelm.demo_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
    assert len(tokenizer) <= model.config.vocab_size
    assert model.device == torch.device("cpu")
    model.eval().tie_weights()


def test_lm_evaluation_harness_hflm_without_a_tokenizer_gives_the_references_loglikelihoods():
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    path = stablelm.demo_model_path()
    requests = [("The cat sat on", " the mat"), ("Once upon a time", " there was a")]

    def loglikelihoods(model):
        lm = huggingface.HFLM(pretrained=model, batch_size=2)
        return lm.loglikelihood(
            [
                Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                for i, r in enumerate(requests)
            ]
        )

    ours = stablelm.StableLmForCausalLM.from_pretrained(path, optimize=False)
    assert loglikelihoods(ours) == loglikelihoods(transformers.StableLmForCausalLM.from_pretrained(path))


@pytest.mark.parametrize("ours_tokenizer", [False, True])
def test_text_generation_pipeline_gives_the_references_text(ours_tokenizer):
    ours, ref = make_pair(tiny_config(vocab_size=50304, max_position_embeddings=64))
    folder = "tests/fixtures/gpt-neox-20b"
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer = stablelm.AutoTokenizer.from_pretrained(folder) if ours_tokenizer else ref_tokenizer
    options = dict(max_new_tokens=6, do_sample=False)
    expected = transformers.pipeline("text-generation", model=ref, tokenizer=ref_tokenizer)(
        "Hello", **options
    )
    got = transformers.pipeline("text-generation", model=ours, tokenizer=tokenizer)("Hello", **options)
    assert got == expected


def test_text_generation_pipeline_takes_stablelms_tokenizer():
    """The tokenizer half of the pipeline check (the model half waits for the generation_config object):
    stablelm's tokenizer in the reference's pipeline gives the reference tokenizer's text."""
    _, ref = make_pair(tiny_config(vocab_size=50304, max_position_embeddings=64))
    folder = "tests/fixtures/gpt-neox-20b"
    options = dict(max_new_tokens=6, do_sample=False)
    results = [
        transformers.pipeline("text-generation", model=ref, tokenizer=tokenizer)(
            ["Hello", "The weather"], **options
        )
        for tokenizer in (
            stablelm.AutoTokenizer.from_pretrained(folder),
            transformers.AutoTokenizer.from_pretrained(folder),
        )
    ]
    assert results[0] == results[1]
    assert results[0][0][0]["generated_text"].startswith("Hello")


def _trainer_run(model, tokenizer, tmp_path):
    """Two optimizer steps of transformers' Trainer (gradient accumulation 2, padded batches from the data
    collator), then evaluate(): the logged losses and grad norms, and the metrics."""
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["hello world this is a test of the trainer", "short", "x y z", "the quick brown fox jumps"]
    data = [dict(tokenizer(text)) for text in texts]
    args = transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
    )  # fmt: skip
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator
    )
    trainer.train()
    logged = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    return logged, trainer.evaluate(), trainer.label_names


def test_the_references_trainer_logs_and_evaluates_as_with_the_references_model(tmp_path):
    """Its num_items_in_batch counts the labels a causal LM predicts (each row's first left out: `loss_type`),
    and its labels are `labels` alone (a `shift_labels` parameter made it compute no evaluation loss)."""
    ours, ref = make_pair(tiny_config(vocab_size=50304, max_position_embeddings=64))
    ours.train(), ref.train()
    folder = "tests/fixtures/gpt-neox-20b"
    got = _trainer_run(ours, stablelm.AutoTokenizer.from_pretrained(folder), tmp_path / "ours")
    expected = _trainer_run(ref, transformers.AutoTokenizer.from_pretrained(folder), tmp_path / "ref")
    assert got[2] == expected[2] == ["labels"]
    assert got[0] == expected[0]
    assert got[1]["eval_loss"] == expected[1]["eval_loss"]
