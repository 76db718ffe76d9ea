"""GenerationMixin: what a model that generates offers the reference's tools around `generate` (peft's
`PeftModelForCausalLM`, pipelines, lm-evaluation-harness): its generation defaults as a `GenerationConfig`,
the inputs of one decode step, and the scores of generated tokens. The reference's models inherit
theirs under the same name."""

from __future__ import annotations

import torch

from .cache import Cache
from .generation import GenerationConfig
from .generation.config import as_generation_config
from .generation.outputs import transition_scores
from .model import pick_cache


class GenerationMixin:
    """Part of `StableLmForCausalLM`: it reads `config`."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: object,
    ) -> dict[str, object]:
        """The keyword arguments of one forward step of a decode loop, as the reference's (peft's
        `PeftModelForCausalLM` and other tools call it): the ids not yet in the cache (the last
        `next_sequence_length`), or the prompt's embeddings on the first step; position and token-type ids
        cut to the same length; every other keyword passed on (`use_cache`, ...), `labels` excepted."""
        cache = pick_cache(cache, kwargs.pop("past_key_values", None))
        inputs: dict[str, object] = {}
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds[:, -next_sequence_length:] if next_sequence_length else inputs_embeds
            inputs["input_ids"], inputs["inputs_embeds"] = None, embeds.clone()
            length = embeds.shape[1]
        else:
            ids = input_ids[:, -next_sequence_length:] if next_sequence_length else input_ids
            inputs["input_ids"] = ids.clone()
            length = ids.shape[1]
        if cache is not None:
            inputs["cache"] = cache
        for name in ("position_ids", "token_type_ids"):
            value = kwargs.pop(name, None)
            if value is not None:
                inputs[name] = value[..., -length:].clone()
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        kwargs.pop("labels", None)
        for key, value in kwargs.items():
            inputs.setdefault(key, value)
        return inputs

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """The score of each generated token (B, n) from `generate`'s `scores` (and `beam_indices` after
        beam search), as the reference's method: with `normalize_logits`, log-probabilities."""
        return transition_scores(
            sequences,
            scores,
            beam_indices,
            vocab_size=self.config.vocab_size,
            normalize_logits=normalize_logits,
        )

    @property
    def generation_config(self) -> GenerationConfig:
        """The generation defaults: generation_config.json's (from_pretrained reads it), else the
        config's special tokens. May be set to a GenerationConfig (stablelm's or the reference's), a dict
        of generation_config.json's keys, or None (back to the config's special tokens)."""
        found = self.__dict__.get("_generation_config")
        if found is None:
            found = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = found
        return found

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | dict | None) -> None:
        self.__dict__["_generation_config"] = as_generation_config(value, name="model.generation_config")
