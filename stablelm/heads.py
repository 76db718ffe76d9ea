"""StableLmForCausalLM, the language-modelling head over StableLmModel, and the checks of forward inputs
that every head shares (the classifiers are in `classifiers.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cache import Cache
from .config import StableLmConfig
from .generation import UNSET
from .generation.call import run_generate
from .generation.inputs import check_attention_mask, check_input_ids, check_inputs_embeds
from .generation.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .generation_mixin import GenerationMixin
from .layers import Linear
from .losses import causal_lm_loss
from .model import StableLmModel, StableLmPreTrainedModel, pick_cache
from .outputs import CausalLMOutput


def check_forward_inputs(
    model: StableLmModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> None:
    """Clear errors for inputs the decoder cannot take: ids that are not integers or lie outside the
    vocabulary (else an IndexError from inside torch's embedding), embeddings of the wrong width, a mask
    that is not (B, past + T) of 0 and 1. The value checks read the tensors back, so they run on the CPU
    and, on an accelerator, for prompts (T > 1) only: never per decode step, nor while compiling."""
    if input_ids is not None and inputs_embeds is None:
        check_input_ids(input_ids, model.embed_tokens.num_embeddings)
        B, T = input_ids.shape
    elif inputs_embeds is not None and input_ids is None:
        check_inputs_embeds(inputs_embeds, model.config.hidden_size)
        B, T = inputs_embeds.shape[:2]
    else:
        return  # StableLmModel.forward says to pass exactly one
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
    ):
        check_attention_mask(attention_mask, B, positions=T)  # a 4-D mask is checked where it is built


def wants_dict(config: StableLmConfig, return_dict: bool | None) -> bool:
    """Whether forward returns its output record (else `to_tuple()` of it), as `return_dict` or the config say."""
    return config.return_dict if return_dict is None else return_dict


class StableLmForCausalLM(GenerationMixin, StableLmPreTrainedModel):
    """StableLM with a language-modelling head: next-token logits over the vocabulary."""

    kv_cache_dtype: torch.dtype | None = None  # generate's static cache dtype (None: the model's)

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__(config)
        self.model = StableLmModel(config)
        self.vocab_size = config.vocab_size  # as the reference's; resize_token_embeddings updates it
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init(self.lm_head)

    accepts_loss_kwargs = True  # forward takes num_items_in_batch, which the reference's Trainer passes

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
    ) -> CausalLMOutput | tuple:
        """Logits (B, T, V) for every position, or only the last `logits_to_keep` (0 keeps all; a 1-D
        tensor picks positions). With `labels` (B, T), also the shifted cross-entropy loss (see
        `causal_lm_loss` for `num_items_in_batch` and `shift_labels`). Other arguments as
        `StableLmModel.forward`; `return_dict=False` returns `to_tuple()`."""
        check_forward_inputs(self.model, input_ids, attention_mask, inputs_embeds)
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        # As rows (B * k, C): on a strided (B, k, C) slice, matmul batches the product and copies the
        # whole LM head, expanded per row, whenever the weights do not require grad (after
        # requires_grad_(False), say); rows take the one matrix product the reference's folded path takes.
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(
                logits, labels, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels
            )
        result = CausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if wants_dict(self.config, return_dict) else result.to_tuple()
