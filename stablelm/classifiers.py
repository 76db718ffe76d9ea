"""The classification heads over StableLmModel: a whole sequence (from its last real token) and every token."""

from __future__ import annotations

import torch
from torch import nn

from .cache import Cache
from .config import StableLmConfig
from .heads import check_forward_inputs, wants_dict
from .layers import Linear
from .losses import sequence_classification_loss, token_classification_loss
from .model import StableLmModel, StableLmPreTrainedModel, pick_cache
from .outputs import SequenceClassifierOutput, TokenClassifierOutput


class StableLmForSequenceClassification(StableLmPreTrainedModel):
    """StableLM scoring a whole sequence from its last real token (classification or regression)."""

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__(config)
        self.model = StableLmModel(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init(self.score)

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
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """Logits (B, num_labels) at each row's last non-pad token; with `labels`, the loss of the
        config's `problem_type` (inferred from num_labels and the labels' dtype when unset)."""
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
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        last = self._last_token(input_ids, attention_mask, logits)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(
                pooled, labels, num_labels=self.config.num_labels, problem_type=self.config.problem_type
            )
        result = SequenceClassifierOutput(
            loss=loss,
            logits=pooled,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if wants_dict(self.config, return_dict) else result.to_tuple()

    def _last_token(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, logits: torch.Tensor
    ) -> torch.Tensor | int:
        """Index of the rightmost token that is not padding, per row (left or right padding)."""
        B, T = logits.shape[:2]
        positions = torch.arange(T, device=logits.device, dtype=torch.int32)
        if self.config.pad_token_id is not None and input_ids is not None:
            real = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            return (positions * real).argmax(-1)
        if attention_mask is not None:
            real = attention_mask[:, -T:].to(logits.device, torch.int32)
            return (positions * real).argmax(-1)
        if B != 1:
            raise ValueError(
                "Cannot find the last real token of each row: the config has no pad_token_id and no "
                "attention_mask was passed. Set model.config.pad_token_id (e.g. to the tokenizer's) or pass "
                "attention_mask."
            )
        return T - 1


class StableLmForTokenClassification(StableLmPreTrainedModel):
    """StableLM labelling every token (dropout then a linear layer)."""

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__(config)
        self.model = StableLmModel(config)
        dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        )
        self.dropout = nn.Dropout(dropout)
        self.score = Linear(config.hidden_size, config.num_labels)
        self.post_init(self.score)

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
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> TokenClassifierOutput | tuple:
        """Logits (B, T, num_labels); with `labels` (B, T), the cross-entropy loss (-100 ignored)."""
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
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels)
        result = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return result if wants_dict(self.config, return_dict) else result.to_tuple()
