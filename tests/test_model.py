"""The model classes against the reference (transformers' StableLm*) on the same weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    TINY,
    make_pair,
    randomize_,
    reference_config,
    rope_scaling_for,
    tiny_config,
    transformers,
)

import stablelm
from stablelm import (
    StableLmConfig,
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)

FP32_TOL = 1e-4
ATTENTION = {"mha": 8, "gqa": 2, "mqa": 1}  # kv heads for 8 query heads
ROPE_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3"]


def _config(kv="mha", qkv_bias=False, qk_ln=False, parallel=False, prf=0.25, rope="default", **kw):
    config = tiny_config(
        num_key_value_heads=ATTENTION[kv],
        use_qkv_bias=qkv_bias,
        qk_layernorm=qk_ln,
        use_parallel_residual=parallel,
        partial_rotary_factor=prf,
        **kw,
    )
    config.rope_scaling = rope_scaling_for(rope, config.rotary_dim)
    config.validate()
    return config


def _ids(batch=2, length=24, vocab=TINY["vocab_size"], seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# Every combination of the structural flags and rotary fractions, with plain RoPE (72 models), ...
STRUCTURE = list(itertools.product(ATTENTION, [False, True], [False, True], [False, True], [0.25, 0.5, 1.0]))


@pytest.mark.parametrize("kv,qkv_bias,qk_ln,parallel,prf", STRUCTURE)
def test_logits_match_reference_every_flag(kv, qkv_bias, qk_ln, parallel, prf):
    ours, ref = make_pair(_config(kv, qkv_bias, qk_ln, parallel, prf))
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= FP32_TOL


# ... and every rope type with every rotary fraction, on sequences past max_position_embeddings (16)
# so that dynamic and longrope switch to their extended frequencies, over two structural variants.
@pytest.mark.parametrize("rope", ROPE_TYPES)
@pytest.mark.parametrize("prf", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("variant", ["gqa-bias", "mqa-qkln-parallel"])
def test_logits_match_reference_every_rope_type(rope, prf, variant):
    flags = {"gqa-bias": ("gqa", True, False, False), "mqa-qkln-parallel": ("mqa", False, True, True)}[
        variant
    ]
    ours, ref = make_pair(_config(*flags, prf=prf, rope=rope))
    ids = _ids(length=24)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= FP32_TOL
        assert (
            _max_diff(ours(ids[:, :6]).logits, ref(ids[:, :6]).logits) <= FP32_TOL
        )  # within the trained length


@pytest.mark.parametrize("rope", ROPE_TYPES[1:])
def test_each_rope_type_changes_the_logits(rope):
    """Guards the rope matrix above: a scaling that silently fell back to plain RoPE would still 'match'."""
    scaled, _ = make_pair(_config(prf=0.5, rope=rope))
    plain = StableLmForCausalLM(_config(prf=0.5)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        assert _max_diff(scaled(_ids()).logits, plain(_ids()).logits) > 1e-3


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=160, num_attention_heads=2, num_key_value_heads=2),  # head_dim 80 (3B-style MHA)
        dict(
            hidden_size=320,
            num_attention_heads=2,
            num_key_value_heads=1,
            qk_layernorm=True,
            use_parallel_residual=True,
        ),
    ],
    ids=["head_dim80", "head_dim160-12b-style"],
)
def test_head_dims_that_are_not_powers_of_two(shape):
    ours, ref = make_pair(tiny_config(**shape))
    assert ours.config.head_dim in (80, 160)
    with torch.no_grad():
        assert _max_diff(ours(_ids()).logits, ref(_ids()).logits) <= FP32_TOL


def test_tied_embeddings_share_one_tensor_and_match():
    ours, ref = make_pair(tiny_config(tie_word_embeddings=True))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.num_parameters() == ref.num_parameters()
    with torch.no_grad():
        assert _max_diff(ours(_ids()).logits, ref(_ids()).logits) <= FP32_TOL


@pytest.mark.parametrize("kw", [{}, dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True)])
@pytest.mark.parametrize(
    "ours_cls,ref_name",
    [
        (StableLmForCausalLM, "StableLmForCausalLM"),
        (StableLmModel, "StableLmModel"),
        (StableLmForSequenceClassification, "StableLmForSequenceClassification"),
        (StableLmForTokenClassification, "StableLmForTokenClassification"),
    ],
)
def test_state_dict_keys_and_shapes_equal_reference(ours_cls, ref_name, kw):
    config = tiny_config(num_key_value_heads=2, **kw)
    ref = getattr(transformers, ref_name)(reference_config(config))
    ours = ours_cls(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_num_parameters_matches_reference():
    config = tiny_config(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True)
    ours, ref = make_pair(config)
    assert ours.num_parameters() == ref.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)


def bf16_pair(config):
    ours, ref = make_pair(config)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    # .to() rounds both models' rotary frequencies to bf16 alike
    assert torch.equal(ref.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    return ours, ref


@pytest.mark.parametrize(
    "kw", [dict(num_key_value_heads=2), dict(num_key_value_heads=1, qk_layernorm=True, use_qkv_bias=True)]
)
def test_bf16_matches_reference(kw):
    """bf16 runs the same operations in the same order as the reference, so the logits are equal bit for
    bit on CPU; the tolerance (one bf16 ulp at the logits' magnitude, 2**-7 relative) only absorbs a
    different summation order should a future kernel change one side."""
    ours, ref = bf16_pair(tiny_config(**kw))
    with torch.no_grad():
        a, b = ours(_ids()).logits, ref(_ids()).logits
    assert a.dtype == torch.bfloat16
    assert _max_diff(a, b) <= 2**-7 * b.float().abs().max().item()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_matches_reference_on_real_tokens(side, attn):
    ours, ref = make_pair(_config("gqa", qk_ln=True), attn=attn)
    ids = _ids(batch=3, length=10)
    mask = torch.ones_like(ids)
    lengths = [10, 6, 3]
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, : 10 - n] = 0
        else:
            mask[row, n:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert _max_diff(a[real], b[real]) <= FP32_TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_positions_loss_and_gradients_match_reference(attn):
    """Also at the padded positions, where a query has no key to attend to: the reference's SDPA gives
    them zeros, its eager attention weighs every key alike; the logits there, a loss whose labels do not
    mask them (the last pad predicts the first real token), and the gradients follow."""
    ours, ref = make_pair(_config("gqa", qk_ln=True), attn=attn)
    ours.train(), ref.train()
    ids = _ids(batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    a, b = ours(ids, attention_mask=mask, labels=ids), ref(ids, attention_mask=mask, labels=ids)
    assert _max_diff(a.logits, b.logits) <= FP32_TOL
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    a.loss.backward(), b.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert _max_diff(p.grad, grads[name].grad) <= 1e-5, name


def test_left_padded_row_equals_the_unpadded_row():
    """Padding is invisible: with position ids from the mask, a padded row gives the row's own logits."""
    ours, _ = make_pair(_config("gqa"))
    ids = _ids(batch=1, length=6)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = ours(ids).logits
        in_batch = ours(padded, attention_mask=mask, position_ids=positions).logits[:, 4:]
    assert _max_diff(alone, in_batch) <= 1e-5


def test_loss_with_labels_matches_reference():
    ours, ref = make_pair(_config("gqa", qkv_bias=True))
    ids = _ids(length=12)
    labels = ids.clone()
    labels[0, :3] = -100
    a, b = ours(ids, labels=labels), ref(ids, labels=labels)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    # -100 really is ignored: changing an ignored label's position to another -100 changes nothing,
    # changing a counted label changes the loss.
    other = labels.clone()
    other[1, 5] = (other[1, 5] + 1) % TINY["vocab_size"]
    assert abs(ours(ids, labels=other).loss.item() - a.loss.item()) > 1e-6


def test_gradients_match_reference():
    ours, ref = make_pair(_config("gqa", qk_ln=True, qkv_bias=True))
    ids = _ids(length=10)
    ours(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert _max_diff(p.grad, ref_grads[name].grad) <= 1e-5, name


def test_inputs_embeds_equal_input_ids():
    ours, ref = make_pair(_config())
    ids = _ids()
    embeds = ours.model.embed_tokens(ids)
    with torch.no_grad():
        assert _max_diff(ours(inputs_embeds=embeds).logits, ours(ids).logits) == 0.0
        assert _max_diff(ours(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits) <= FP32_TOL


def test_exactly_one_of_input_ids_and_inputs_embeds():
    model = StableLmForCausalLM(tiny_config())
    ids = _ids()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_input_ids_must_be_2d():
    with pytest.raises(ValueError, match="must be 2-D"):
        StableLmForCausalLM(tiny_config())(torch.tensor([1, 2, 3]))


def test_hidden_states_match_reference():
    ours, ref = make_pair(_config("gqa"))
    with torch.no_grad():
        a = ours(_ids(), output_hidden_states=True).hidden_states
        b = ref(_ids(), output_hidden_states=True).hidden_states
    assert len(a) == len(b) == TINY["num_hidden_layers"] + 1
    for x, y in zip(a, b, strict=True):
        assert _max_diff(x, y) <= FP32_TOL


def test_logits_to_keep():
    ours, ref = make_pair(_config())
    ids = _ids()
    with torch.no_grad():
        full = ours(ids).logits
        assert _max_diff(ours(ids, logits_to_keep=1).logits, full[:, -1:]) <= 1e-5  # other GEMM blocking
        assert _max_diff(ours(ids, logits_to_keep=3).logits, ref(ids, logits_to_keep=3).logits) <= FP32_TOL
        picked = torch.tensor([0, 5, 7])
        assert _max_diff(ours(ids, logits_to_keep=picked).logits, full[:, picked]) <= 1e-5


def test_output_record_access():
    out = StableLmForCausalLM(tiny_config())(_ids(), use_cache=False)
    assert out["logits"] is out.logits is out[0]
    assert out.past_key_values is None and out.loss is None


@pytest.mark.parametrize(
    "num_labels,problem_type,make_labels",
    [
        (1, None, lambda b: torch.randn(b)),  # regression, inferred
        (3, None, lambda b: torch.tensor([0, 2])),  # single label, inferred from integer labels
        (
            3,
            None,
            lambda b: torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
        ),  # multi label, inferred from float labels
        (2, "regression", lambda b: torch.randn(b, 2)),
    ],
    ids=["regression", "single_label", "multi_label", "regression-2"],
)
def test_sequence_classification_matches_reference(num_labels, problem_type, make_labels):
    config = tiny_config(
        num_key_value_heads=2, pad_token_id=0, num_labels=num_labels, problem_type=problem_type
    )
    ours, ref = make_pair(
        config, ours_cls=StableLmForSequenceClassification, ref_cls_name="StableLmForSequenceClassification"
    )
    ids = _ids(length=8).clamp(min=1)
    ids[0, -3:] = 0  # right padding
    ids[1, :2] = 0  # left padding
    labels = make_labels(2)
    a, b = ours(ids, labels=labels), ref(ids, labels=labels)
    assert a.logits.shape == (2, num_labels)
    assert _max_diff(a.logits, b.logits) <= FP32_TOL
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_sequence_classification_pools_the_last_real_token():
    config = tiny_config(pad_token_id=0, num_labels=2)
    model = StableLmForSequenceClassification(config).eval()
    randomize_(model)
    ids = _ids(batch=1, length=5).clamp(min=1)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert _max_diff(model(ids).logits, model(padded).logits) <= 1e-5


def test_sequence_classification_without_pad_token_uses_the_mask_or_says_what_to_set():
    model = StableLmForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = _ids(length=6)
    with pytest.raises(ValueError, match="pad_token_id"):
        model(ids)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        pooled = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :4]).logits
    assert _max_diff(pooled[1:], alone) <= 1e-5


@pytest.mark.parametrize("classifier_dropout", [None, 0.3])
def test_token_classification_matches_reference(classifier_dropout):
    config = tiny_config(num_labels=4, classifier_dropout=classifier_dropout, hidden_dropout=0.1)
    ours, ref = make_pair(
        config, ours_cls=StableLmForTokenClassification, ref_cls_name="StableLmForTokenClassification"
    )
    assert ours.dropout.p == ref.dropout.p == (classifier_dropout if classifier_dropout is not None else 0.1)
    ids = _ids(length=8)
    labels = torch.randint(0, 4, ids.shape)
    labels[0, :2] = -100
    a, b = ours(ids, labels=labels), ref(ids, labels=labels)
    assert _max_diff(a.logits, b.logits) <= FP32_TOL
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_dropout_only_in_training():
    config = tiny_config(hidden_dropout=0.5, attention_dropout=0.5)
    model = StableLmForCausalLM(config)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        assert _max_diff(model(ids).logits, model(ids).logits) == 0.0
    model.train()
    torch.manual_seed(0)
    first = model(ids).logits
    torch.manual_seed(1)
    assert _max_diff(first, model(ids).logits) > 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradient_checkpointing_gives_the_same_gradients(attn):
    config = tiny_config(num_key_value_heads=2)
    config.attn_implementation = attn
    model = StableLmForCausalLM(config)
    randomize_(model)
    ids = _ids(length=10)
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    out = model(ids, labels=ids, use_cache=True)
    assert out.past_key_values is None  # no cache while recomputing layers
    out.loss.backward()
    for name, p in model.named_parameters():
        assert _max_diff(p.grad, plain[name]) <= 1e-6, name


def test_initialisation_follows_the_reference():
    config = tiny_config(
        pad_token_id=3, initializer_range=0.05, use_qkv_bias=True, hidden_size=256, vocab_size=512
    )
    model = StableLmForCausalLM(config)
    emb = model.model.embed_tokens.weight
    assert torch.all(emb[3] == 0)
    assert abs(emb.std().item() - 0.05) < 0.005
    assert abs(model.model.layers[0].mlp.gate_proj.weight.std().item() - 0.05) < 0.005
    assert torch.all(model.model.layers[0].self_attn.q_proj.bias == 0)
    assert torch.all(model.model.norm.weight == 1) and torch.all(model.model.norm.bias == 0)


def test_sdpa_equals_eager():
    config = _config("gqa", qk_ln=True, qkv_bias=True, prf=0.5)
    eager, _ = make_pair(config, attn="eager")
    config_sdpa = _config("gqa", qk_ln=True, qkv_bias=True, prf=0.5)
    sdpa = StableLmForCausalLM(config_sdpa).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        assert _max_diff(eager(ids).logits, sdpa(ids).logits) <= 1e-5
        assert (
            _max_diff(
                eager(ids, attention_mask=mask).logits[mask.bool()],
                sdpa(ids, attention_mask=mask).logits[mask.bool()],
            )
            <= 1e-5
        )


def test_flash_attention_without_the_package_says_what_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install flash-attn"):
        StableLmForCausalLM(tiny_config(attn_implementation="flash_attention_2"))


def test_model_rejects_a_config_of_another_type():
    with pytest.raises(TypeError, match="StableLmConfig"):
        StableLmForCausalLM({"hidden_size": 8})


def test_public_api_aliases():
    assert stablelm.AutoModelForCausalLM is StableLmForCausalLM
    assert stablelm.AutoModel is StableLmModel
    assert stablelm.AutoConfig is StableLmConfig
    assert stablelm.AutoModelForSequenceClassification is StableLmForSequenceClassification
    assert stablelm.AutoModelForTokenClassification is StableLmForTokenClassification
    assert callable(stablelm.set_seed)


def test_set_seed_seeds_torch_and_python():
    import random

    stablelm.set_seed(7)
    a = (torch.rand(3), random.random())
    stablelm.set_seed(7)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_activations_are_the_references_and_the_configs():
    from transformers.activations import ACT2FN

    from stablelm.activations import ACT_FNS
    from stablelm.config_checks import ACTIVATIONS

    assert set(ACT_FNS) == ACTIVATIONS
    x = torch.linspace(-6, 6, 1001)
    for name, fn in ACT_FNS.items():
        assert torch.allclose(fn(x), ACT2FN[name](x), atol=1e-6), name


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_lm_head_is_one_matrix_product_whatever_requires_grad_says(requires_grad, keep):
    """A strided slice of the hidden states must not make matmul batch the product and copy the head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model, ref = make_pair(tiny_config())
    model.requires_grad_(requires_grad)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids, logits_to_keep=keep).logits
        with OpNames() as ops:
            logits = model(ids, logits_to_keep=keep).logits
    assert torch.equal(logits, expected)
    assert not any(name.startswith("bmm") or name.startswith("expand") for name in ops.names[-6:]), ops.names[
        -6:
    ]
