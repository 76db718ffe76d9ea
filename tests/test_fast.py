"""The inference speed transforms change no output bit and keep the checkpoint's keys."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, tiny_config, transformers

from stablelm import StableLmForCausalLM
from stablelm.fast import PackedLinear, can_pack, fuse_projections, optimize_for_inference

VARIANTS = {
    "gqa-bias-qkln": dict(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True),
    "mqa-parallel": dict(num_key_value_heads=1, use_parallel_residual=True),
    "tied": dict(tie_word_embeddings=True),
}


def _ids(batch=2, length=12):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_optimized_model_gives_identical_logits_and_state_dict(variant, dtype):
    model, _ = make_pair(tiny_config(**VARIANTS[variant]))
    model = model.to(dtype)
    with torch.no_grad():
        before = model(_ids()).logits
    state = model.state_dict()
    optimize_for_inference(model)
    assert any(isinstance(m, PackedLinear) for m in model.modules()) == can_pack(model)
    assert model.model.layers[0].self_attn.qkv_proj is not None
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, before)
    after = model.state_dict()
    assert list(after) == list(state) or set(after) == set(state)
    for key, tensor in state.items():
        assert torch.equal(after[key], tensor), key


def test_optimized_model_saves_what_the_reference_loads(tmp_path):
    model, ref = make_pair(tiny_config(**VARIANTS["gqa-bias-qkln"]))
    optimize_for_inference(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.StableLmForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, ref(_ids()).logits)


def test_optimized_model_loads_a_state_dict():
    model, ref = make_pair(tiny_config(**VARIANTS["gqa-bias-qkln"]))
    fresh = optimize_for_inference(StableLmForCausalLM(tiny_config(**VARIANTS["gqa-bias-qkln"])))
    fresh.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(_ids()).logits, model(_ids()).logits)


def test_generation_is_unchanged_and_the_fused_step_compiles():
    model, ref = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    ids = _ids(1, 5)
    expected = ref.generate(ids, max_new_tokens=10)
    optimize_for_inference(model)
    assert model.generate(ids, max_new_tokens=10).tolist() == expected.tolist()
    fused, _ = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    optimize_for_inference(fused, pack=False)  # compile works on plain (fused) weights
    assert fused.generate(ids, max_new_tokens=10, compile=True).tolist() == expected.tolist()


def test_fusing_twice_is_harmless():
    model, _ = make_pair(tiny_config())
    fuse_projections(model)
    fuse_projections(model)
    with torch.no_grad():
        model(_ids())


def test_packing_where_it_cannot_apply_is_a_clear_error():
    model = StableLmForCausalLM(tiny_config()).to(torch.float16)
    assert not can_pack(model)
    with pytest.raises(ValueError, match="Packing needs the model on the CPU in float32 or bfloat16"):
        optimize_for_inference(model, pack=True)
    optimize_for_inference(model)  # the default skips packing
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
