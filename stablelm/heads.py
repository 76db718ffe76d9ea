"""StableLmForCausalLM, the language-modelling head over StableLmModel, and the checks of forward inputs
that every head shares (the classifiers are in `classifiers.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cache import Cache
from .config import StableLmConfig
from .generation.inputs import check_attention_mask, check_input_ids, check_inputs_embeds
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
    # The reference's name of the loss, which its Trainer reads: "ForCausalLM" shifts the labels, so the
    # tokens counted for num_items_in_batch leave out each row's first (without it, losses were too small).
    loss_type = "ForCausalLM"

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

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
        **loss_kwargs: Any,
    ) -> CausalLMOutput | tuple:
        """Logits (B, T, V) for every position, or only the last `logits_to_keep` (0 keeps all; a 1-D
        tensor picks positions). With `labels` (B, T), also the shifted cross-entropy loss (see
        `causal_lm_loss` for `num_items_in_batch` and `shift_labels`). Other arguments as
        `StableLmModel.forward`; `return_dict=False` returns `to_tuple()`.

        `shift_labels` comes as a keyword of `loss_kwargs`, as the reference takes it: a named parameter with
        "label" in its name would be one of the batch's labels to the reference's Trainer (`find_labels`),
        which then computed no evaluation loss for batches without it."""
        shift_labels = loss_kwargs.pop("shift_labels", None)
        if loss_kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(loss_kwargs)}")
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
