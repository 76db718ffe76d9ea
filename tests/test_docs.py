"""The StableLM documentation's snippets, with only the import line changed and the hub id replaced by a
checkpoint made here (random weights saved by the reference, the real GPT-NeoX tokenizer files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, transformers

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("stablelm-3b-4e1t")
    config = tiny_config(vocab_size=50304, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    ref = transformers.StableLmForCausalLM(transformers.StableLmConfig.from_dict(config.to_dict()))
    with torch.no_grad():
        ref.lm_head.weight.mul_(20)  # peaked, so that sampling follows the weights rather than rounding
    ref.to(torch.bfloat16).save_pretrained(folder)  # as the hub's checkpoint: bfloat16
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "gpt-neox-20b" / name, folder / name)
    return str(folder)


def test_first_snippet(checkpoint):
    from stablelm import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(0)
    device = "cpu"  # the snippet says "cuda"; this machine has none
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.to(device)
    model_inputs = tokenizer("The weather is always wonderful in", return_tensors="pt").to(model.device)
    generated_ids = model.generate(**model_inputs, max_length=32, do_sample=True)
    responses = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)

    assert isinstance(responses, list) and len(responses) == 1
    assert responses[0].startswith("The weather is always wonderful in")
    assert model.dtype == torch.bfloat16  # dtype "auto" by default, as the reference

    # The same numbers as the reference on the same weights.
    transformers.set_seed(0)
    ref_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    ref_inputs = ref_tok("The weather is always wonderful in", return_tensors="pt")
    ref_ids = ref_model.generate(**ref_inputs, max_length=32, do_sample=True)
    assert generated_ids.tolist() == ref_ids.tolist()
    assert responses == ref_tok.batch_decode(ref_ids, skip_special_tokens=True)


def test_flash_attention_snippet_says_what_is_missing_without_flash_attn(checkpoint):
    """The second snippet asks for flash_attention_2 in bfloat16 on CUDA: here it must fail clearly."""
    from stablelm import AutoModelForCausalLM

    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash_attn"):
            AutoModelForCausalLM.from_pretrained(
                checkpoint, dtype=torch.bfloat16, attn_implementation="flash_attention_2"
            )
    else:  # pragma: no cover - only where flash-attn is installed
        pytest.skip("flash_attn is installed; the GPU tests cover it")
