"""GenerationMixin: what a model that generates offers the reference's tools around `generate` (peft's
`PeftModelForCausalLM`, pipelines, lm-evaluation-harness): its generation defaults as a `GenerationConfig`,
`generate` itself, the inputs of one decode step, and the scores of generated tokens. The reference's models inherit
theirs under the same name."""

from __future__ import annotations

from typing import Any

import torch

from .cache import Cache
from .generation import UNSET, GenerationConfig
from .generation.call import run_generate
from .generation.config import as_generation_config
from .generation.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, transition_scores
from .model import pick_cache


class GenerationMixin:
    """Part of `StableLmForCausalLM`: it reads `config`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs: torch.Tensor | None = None,
        generation_config=None,  # noqa: ANN001 - GenerationConfig (ours or the reference's) or dict
        logits_processor=None,  # noqa: ANN001 - a list of callables (input_ids, scores) -> scores
        stopping_criteria=None,  # noqa: ANN001 - a list of callables (input_ids, scores) -> bool tensor
        past_key_values: Cache | None = None,
        prefix_allowed_tokens_fn=None,  # noqa: ANN001 - (batch_id, input_ids) -> list of allowed token ids
        max_length: int | None = UNSET,
        max_new_tokens: int | None = UNSET,
        min_new_tokens: int | None = UNSET,
        do_sample: bool | None = UNSET,
        temperature: float | None = UNSET,
        top_k: int | None = UNSET,
        top_p: float | None = UNSET,
        min_p: float | None = UNSET,
        repetition_penalty: float | None = UNSET,
        eos_token_id: int | list[int] | None = UNSET,
        pad_token_id: int | None = UNSET,
        num_return_sequences: int | None = UNSET,
        num_beams: int | None = UNSET,
        length_penalty: float | None = UNSET,
        early_stopping: bool | str | None = UNSET,
        no_repeat_ngram_size: int | None = UNSET,
        bad_words_ids: list[list[int]] | None = UNSET,
        return_dict_in_generate: bool | None = UNSET,
        output_scores: bool | None = UNSET,
        output_logits: bool | None = UNSET,
        use_cache: bool | None = UNSET,
        stop_strings: str | list[str] | None = UNSET,
        tokenizer=None,  # noqa: ANN001 - a stablelm.Tokenizer; typed loosely to keep imports pointing down
        streamer=None,  # noqa: ANN001 - anything with put(tensor) and end()
        generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
        cache_implementation: str | None = UNSET,
        compile: bool = UNSET,
        prompt_lookup_num_tokens: int | None = UNSET,
        max_matching_ngram_size: int | None = UNSET,
        assistant_model=None,  # noqa: ANN001 - a smaller causal LM with the model's vocabulary
        num_assistant_tokens: int | None = UNSET,
        assistant_confidence_threshold: float | None = UNSET,
        **settings: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Generate continuations of the prompt, as the reference's `generate` does.

        Unset arguments come from `generation_config` (stablelm's, the reference's or a dict), then the
        model's `generation_config` (the checkpoint's generation_config.json), then the reference's
        defaults: `max_length` 20 new tokens (capped at the model's context), greedy, and when sampling
        temperature 1.0, top_k 50, top_p 1.0, no min_p, repetition_penalty 1.0. `temperature=0` is
        greedy. `eos_token_id` may be a list; finished rows are padded with `pad_token_id` (default: the
        first EOS). `stop_strings` (needs `tokenizer`) end a row when its text reaches one of them.
        `num_beams` > 1 is beam search (`length_penalty`, `early_stopping` True/False/"never",
        `num_return_sequences` <= `num_beams`; beam sampling with `do_sample`). Every other field of the
        reference's GenerationConfig may be passed in `settings` (`typical_p`, `sequence_bias`,
        `forced_eos_token_id`, ... see docs/generation.md); those stablelm does not implement are refused
        by name. `logits_processor` / `stopping_criteria` add callables with the reference's signatures
        (its own LogitsProcessorList / StoppingCriteriaList work), and `prefix_allowed_tokens_fn` constrains
        each row's next token as the reference's does. `past_key_values` continues from a
        cache holding the first positions of `input_ids` (which repeats the cached tokens); `use_cache=False`
        recomputes the whole sequence each step. `inputs` is the reference's name of `input_ids`.
        `inputs_embeds` is the prompt as embeddings; given with `input_ids` of the same positions, the model
        reads the embeddings and the sequences start with the ids. Given neither, the prompt is
        `bos_token_id`. `position_ids` (B, T) are the prompt's rotary positions (the new tokens continue
        from each row's last one). `logits_to_keep` (an int >= 0) is accepted and changes nothing: each
        token is picked from the last position's logits.
        `cache_implementation` is "static" (preallocated, default) or "dynamic". `compile=True` compiles
        the decode step with torch.compile (paid once per model, batch size and length; falls back to eager
        with a notice when compilation is unavailable). `prompt_lookup_num_tokens` or `assistant_model`
        decode speculatively (one prompt at a time; see docs/speculative.md): same tokens at greedy, same
        distribution when sampling.

        Returns:
            LongTensor (B * num_return_sequences, prompt + new): the prompt followed by the new tokens
            (only the new tokens when called with `inputs_embeds` alone); with `return_dict_in_generate`, a
            `GenerateDecoderOnlyOutput` (or `GenerateBeamDecoderOnlyOutput`) holding them as `sequences`,
            with `scores` (`output_scores`), `logits` (`output_logits`), `hidden_states`
            (`output_hidden_states`) and the `cache`.
        """
        named = dict(
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            num_return_sequences=num_return_sequences,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            no_repeat_ngram_size=no_repeat_ngram_size,
            bad_words_ids=bad_words_ids,
            return_dict_in_generate=return_dict_in_generate,
            output_scores=output_scores,
            output_logits=output_logits,
            use_cache=use_cache,
            stop_strings=stop_strings,
            cache_implementation=cache_implementation,
            compile=compile,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens,
            max_matching_ngram_size=max_matching_ngram_size,
            num_assistant_tokens=num_assistant_tokens,
            assistant_confidence_threshold=assistant_confidence_threshold,
        )
        return run_generate(
            self,
            input_ids,
            attention_mask,
            inputs=inputs,
            inputs_embeds=inputs_embeds,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            past_key_values=past_key_values,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            tokenizer=tokenizer,
            streamer=streamer,
            generator=generator,
            assistant_model=assistant_model,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            settings={**named, **settings},
        )

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
