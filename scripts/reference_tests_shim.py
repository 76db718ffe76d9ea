"""Make transformers' StableLM names point at stablelm's classes, for the reference's own test file.

Imported by the conftest.py that `scripts/run_reference_tests.py` writes (only with `--ours`), before
the test modules import `transformers.StableLmForCausalLM` and friends. It changes names only: every
class flag the tests read (`_supports_sdpa`, `supports_gradient_checkpointing`, ...) is stablelm's own.
"""

from __future__ import annotations

import importlib

import transformers
import transformers.models.stablelm as tf_stablelm
import transformers.models.stablelm.configuration_stablelm as tf_configuration
import transformers.models.stablelm.modeling_stablelm as tf_modeling

import stablelm

NAMES = (
    "StableLmConfig",
    "StableLmModel",
    "StableLmForCausalLM",
    "StableLmForSequenceClassification",
    "StableLmForTokenClassification",
    "StableLmPreTrainedModel",
)


def install() -> None:
    """Substitute the classes, and stablelm's Auto alias for `transformers.AutoModelForCausalLM` (the
    causal-LM mixin builds models through it)."""
    for name in NAMES:
        for module in (transformers, tf_stablelm, tf_modeling, tf_configuration):
            if hasattr(module, name):
                setattr(module, name, getattr(stablelm, name))
    transformers.AutoModelForCausalLM = stablelm.AutoModelForCausalLM


def patch_tester() -> None:
    """CausalLMModelTester infers the config class through transformers' module tables and then checks
    that its class hierarchy names `PreTrainedConfig` (transformers' base class), which stablelm's config
    does not have: name stablelm's classes directly instead."""
    tester = importlib.import_module("tests.causal_lm_tester").CausalLMModelTester

    @classmethod
    def verify_and_infer(cls: type) -> None:
        cls.config_class = stablelm.StableLmConfig
        cls.causal_lm_class = stablelm.StableLmForCausalLM
        cls.sequence_classification_class = stablelm.StableLmForSequenceClassification
        cls.token_classification_class = stablelm.StableLmForTokenClassification

    tester._verify_and_infer_model_attributes = verify_and_infer
