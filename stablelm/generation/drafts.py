"""The drafters of speculative decoding (`speculative`): prompt lookup and an assistant model, as the
reference's `PromptLookupCandidateGenerator` and `AssistedCandidateGenerator`, and `make_draft`, which
picks one from `generate`'s settings."""

from __future__ import annotations

from typing import Any

import torch

from ..cache import Cache
from .config import GenerationConfig, check_integer
from .plan import Plan
from .speculative import Draft, Drafter, Tokens, check_settings, make_room, processed_scores
from .stepper import make_cache

DEFAULT_NGRAM = 2  # the reference's max_matching_ngram_size default
DEFAULT_ASSISTANT_TOKENS = 20  # the reference's num_assistant_tokens default
DEFAULT_CONFIDENCE = 0.4  # the reference's assistant_confidence_threshold default
MAX_SKIP = 8  # greedy prompt lookup: most rounds drafted nothing after drafts that kept nothing


class PromptLookup(Drafter):
    """Drafts by prompt lookup, as the reference's `PromptLookupCandidateGenerator`: find the first
    (leftmost) earlier occurrence of the sequence's last n tokens, n from `max_ngram` down to 1, and
    propose the up to `num_tokens` tokens that followed it, cut before the first EOS. As there, a draft
    is not shortened near `max_new_tokens` (the tokens past it are checked and dropped): the random draws
    of sampling then follow the reference's, and a seeded run gives its tokens.

    Greedy decoding adapts the drafts to how they fare (the text is plain greedy's whatever is drafted;
    only the check's cost changes): after a draft the model did not keep whole, the next drafts are at
    most twice its kept part plus one token long, growing by two tokens after each draft kept whole, up
    to `num_tokens`; after drafts that kept nothing, that many rounds (at most `MAX_SKIP`) draft nothing,
    so a model that does not copy its input decodes at close to plain greedy's speed. Sampling drafts as
    the reference does, every round `num_tokens` (its random draws depend on the drafts' lengths).

    Args:
        num_tokens: Most tokens per draft (`prompt_lookup_num_tokens`).
        max_ngram: Longest n-gram matched (`max_matching_ngram_size`, default 2).
    """

    name = "prompt_lookup_num_tokens"

    def __init__(self, *, num_tokens: int, max_ngram: int = DEFAULT_NGRAM) -> None:
        super().__init__()
        check_integer("prompt_lookup_num_tokens", num_tokens, 1)
        check_integer("max_matching_ngram_size", max_ngram, 1)
        self.num_tokens, self.max_ngram = int(num_tokens), int(max_ngram)
        self.overshoot = self.num_tokens
        self.adaptive, self.cap, self.misses, self.skip = False, self.num_tokens, 0, 0

    def start(self, plan: Plan, seq: Tokens) -> None:
        self.adaptive, self.cap, self.misses, self.skip = plan.params.greedy, self.num_tokens, 0, 0

    def observe(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or not drafted:
            return
        if accepted == drafted:
            self.cap, self.misses = min(self.num_tokens, self.cap + 2), 0
            return
        self.cap = max(1, min(self.cap, 2 * accepted + 1))
        self.misses = 0 if accepted else self.misses + 1
        self.skip = min(MAX_SKIP, self.misses)

    def propose(self, seq: Tokens, limit: int, plan: Plan, generator: torch.Generator | None) -> Draft:
        ids, length = seq.ids[: seq.length], seq.length
        if limit <= 0:
            return Draft(ids[:0], None)
        if self.skip:
            self.skip -= 1
            return Draft(ids[:0], None)
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            starts = (ids.unfold(0, n, 1) == ids[-n:]).all(dim=1).nonzero().flatten()[:2].tolist()
            # The last window is the n-gram itself, with nothing after it to copy.
            start = next((s + n for s in starts if s + n < length), None)
            if start is None:
                continue
            tokens = ids[start : start + (self.cap if self.adaptive else self.num_tokens)]
            if plan.eos is not None:
                hits = torch.isin(tokens, plan.eos).nonzero()
                if hits.numel():  # the reference drafts nothing past (or at) an EOS
                    tokens = tokens[: int(hits[0])]
            return Draft(tokens, None)
        return Draft(ids[:0], None)


class AssistantDraft(Drafter):
    """Drafts with a smaller model of the same vocabulary, as the reference's `AssistedCandidateGenerator`:
    it generates up to `num_tokens` tokens with the same settings (greedy, or sampling with the same
    processors), stopping early at EOS or after a token it gave less than `confidence` probability.

    The assistant keeps its own KV cache across rounds, cropped to the prefix the model accepted.

    Args:
        assistant: A StableLmForCausalLM (or any causal LM taking `past_key_values` and `logits_to_keep`).
        num_tokens: Most tokens per draft (`num_assistant_tokens`, default 20).
        confidence: End a draft after a token below this probability (`assistant_confidence_threshold`,
            default 0.4; 0 turns it off).
    """

    name = "assistant_model"

    def __init__(
        self,
        assistant: Any,
        *,
        num_tokens: int = DEFAULT_ASSISTANT_TOKENS,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> None:
        super().__init__()
        check_integer("num_assistant_tokens", num_tokens, 1)
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, (int, float))
            or not 0 <= confidence <= 1
        ):
            raise ValueError(
                f"assistant_confidence_threshold must be a number in [0, 1], got {confidence!r}."
            )
        self.assistant, self.num_tokens, self.confidence = assistant, int(num_tokens), float(confidence)

    def start(self, plan: Plan, seq: Tokens) -> None:
        self.cache = make_cache(self.assistant, plan, 1, seq.length)
        self.fed = torch.empty_like(seq.ids)  # the tokens the assistant's cache holds, by position
        self.held = 0  # positions in its cache
        self.base = 0  # where the last draft began: positions before it hold accepted tokens

    def propose(self, seq: Tokens, limit: int, plan: Plan, generator: torch.Generator | None) -> Draft:
        start = min(self.held, seq.length - 1)
        differ = (self.fed[self.base : start] != seq.ids[self.base : start]).nonzero()
        if differ.numel():  # a rejected draft token: recompute from there
            start = self.base + int(differ[0])
        self.cache.crop(start)
        self.base = seq.length
        tokens, probs = [], []
        for j in range(min(self.num_tokens, limit)):
            end = seq.length + j
            self.fed[start:end] = seq.ids[start:end]
            logits = _forward(self.assistant, self.cache, seq, start, end, keep=1, plan=plan)
            self.held = start = end
            scores = processed_scores(plan, logits, seq, rows=1, offset=j)
            dist = torch.softmax(scores, dim=-1)
            if plan.params.greedy:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
                probs.append(dist)
            seq.ids[end] = token[0]
            tokens.append(token)
            if (plan.eos is not None and bool(torch.isin(token, plan.eos))) or float(
                dist[0, token[0]]
            ) < self.confidence:
                break
        if not tokens:
            return Draft(seq.ids[:0], None)
        return Draft(torch.cat(tokens), torch.cat(probs) if probs else None)


def make_draft(model: Any, config: GenerationConfig, assistant_model: Any = None) -> Drafter | None:
    """The drafter `config` and `assistant_model` ask for (None: plain decoding). ValueError/TypeError
    naming the setting when it cannot be used."""
    lookup = config.prompt_lookup_num_tokens
    if lookup is not None and assistant_model is not None:
        raise ValueError(
            "Pass one of prompt_lookup_num_tokens and assistant_model: both draft tokens for speculative "
            "decoding (the reference would ignore the assistant)."
        )
    if lookup is not None:
        check_settings("prompt_lookup_num_tokens", config)
        ngram = config.max_matching_ngram_size
        return PromptLookup(num_tokens=lookup, max_ngram=DEFAULT_NGRAM if ngram is None else ngram)
    if assistant_model is None:
        return None
    _check_assistant(model, assistant_model)
    check_settings("assistant_model", config)
    own = getattr(assistant_model, "generation_config", None)

    def setting(name: str, default: Any) -> Any:  # generate's, else the assistant's own, else the default
        value = getattr(config, name)
        if value is None:
            value = own.get(name) if isinstance(own, dict) else getattr(own, name, None)
        return default if value is None else value

    return AssistantDraft(
        assistant_model,
        num_tokens=setting("num_assistant_tokens", DEFAULT_ASSISTANT_TOKENS),
        confidence=setting("assistant_confidence_threshold", DEFAULT_CONFIDENCE),
    )


def _check_assistant(model: Any, assistant: Any) -> None:
    from ..pretrained import StableLmPreTrainedModel

    # The drafts run the assistant's forward over stablelm's cache, which only stablelm's models take (also
    # under peft's wrapper, whose get_base_model() is the stablelm model).
    unwrap = getattr(assistant, "get_base_model", None)
    base = unwrap() if isinstance(assistant, torch.nn.Module) and callable(unwrap) else assistant
    if not isinstance(base, StableLmPreTrainedModel) or not base.can_generate():
        kind = type(assistant)
        raise TypeError(
            f"assistant_model must be a causal language model of stablelm (a StableLmForCausalLM), got "
            f"{kind.__module__}.{kind.__qualname__}; load the assistant with stablelm: "
            "stablelm.AutoModelForCausalLM.from_pretrained(path)."
        )
    ours, theirs = model.config.vocab_size, getattr(assistant.config, "vocab_size", None)
    if ours != theirs:
        raise ValueError(
            f"assistant_model has a vocabulary of {theirs} tokens and the model {ours}: the assistant must "
            "share the model's tokenizer (drafting across tokenizers, the reference's assistant_tokenizer=, "
            "is not supported)."
        )
    device = next(assistant.parameters()).device
    if device != model.device:
        raise ValueError(
            f"assistant_model is on {device} and the model on {model.device}: move the assistant to the "
            "model's device (assistant_model.to(model.device))."
        )


def _forward(
    model: Any, cache: Cache, seq: Tokens, start: int, end: int, *, keep: int, plan: Plan
) -> torch.Tensor:
    """fp32 logits (keep, V) of the last `keep` of positions [start, end), run over a cache holding
    [0, start) by the model's forward (the assistant's: any causal LM)."""
    make_room(model, cache, end, plan, seq)
    inputs: dict[str, Any] = {}
    if seq.mask is not None:
        mask = seq.mask[:, :end]
        inputs["attention_mask"] = mask
        inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, start:end]
    out = model(
        input_ids=seq.ids[None, start:end],
        past_key_values=cache,
        logits_to_keep=keep,
        use_cache=True,
        **inputs,
    )
    return out.logits[0].float()
