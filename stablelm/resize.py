"""Resizing the vocabulary: `resize_token_embeddings` as the reference does it (mean resizing, ties kept)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import Linear

if TYPE_CHECKING:
    from .model import StableLmPreTrainedModel


def resize_token_embeddings(
    model: StableLmPreTrainedModel,
    new_num_tokens: int | None = None,
    *,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
) -> nn.Embedding:
    """See `StableLmPreTrainedModel.resize_token_embeddings`."""
    embedding = model.get_input_embeddings()
    new_num_tokens = _resized_vocab(embedding.num_embeddings, new_num_tokens, pad_to_multiple_of)
    if new_num_tokens is None:
        return embedding
    _refuse_quantized_head(model, new_num_tokens)  # before anything changes
    _resize_embedding(model, embedding, new_num_tokens, mean_resizing=mean_resizing)
    head = model.get_output_embeddings()
    if head is not None:
        _resize_head(model, head, new_num_tokens, mean_resizing=mean_resizing)
    model.config.vocab_size = new_num_tokens
    model.vocab_size = new_num_tokens  # as the reference sets it, on every model resized
    model.base_model.vocab_size = new_num_tokens  # (the reference leaves its backbone's stale)
    _drop_ids_past(model.config, new_num_tokens)
    model.tie_weights()
    return model.get_input_embeddings()


def _refuse_quantized_head(model: StableLmPreTrainedModel, n: int) -> None:
    """A quantized LM head holds integer weights with per-row scales: new rows cannot be drawn as the
    reference draws a dense head's, so its size stays as it is."""
    head = model.get_output_embeddings()
    quant_type = getattr(head, "quant_type", None)
    if quant_type is not None and head.out_features != n:
        raise ValueError(
            f"resize_token_embeddings({n}): the LM head is quantized ({quant_type}), and a quantized layer cannot "
            "be resized. Resize the unquantized model, then quantize it (stablelm.quantize(model, ...), or save it "
            "and load it with quantization_config=...); or keep the LM head dense when quantizing "
            '(QuantizationConfig(..., modules_to_not_convert=["lm_head"])).'
        )


def _drop_ids_past(config, n: int) -> None:  # noqa: ANN001
    """A vocabulary shrunk below a special token's id loses that id (a config naming an id outside its
    vocabulary is refused when loaded), with a warning."""
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(config, name)
        ids = value if isinstance(value, list) else [value]
        kept = [i for i in ids if i is None or i < n]
        if kept == ids:
            continue
        warnings.warn(
            f"resize_token_embeddings({n}): {name} {value} lies outside the new vocabulary; "
            f"config.{name} is now {kept if isinstance(value, list) else None}",
            stacklevel=3,
        )
        setattr(config, name, kept if isinstance(value, list) else None)


def _resize_embedding(
    model: StableLmPreTrainedModel, embedding: nn.Embedding, n: int, *, mean_resizing: bool
) -> None:
    """Resize in place (the Parameter object is kept, so a tied head sees the new rows)."""
    old_n, dim = embedding.weight.shape
    if old_n == n:
        embedding.num_embeddings = n
        return
    # Built and initialised in the reference's order, so that the same seed draws the same new rows.
    new = nn.Embedding(n, dim, device=embedding.weight.device, dtype=embedding.weight.dtype)
    _init_new_rows(model, new, embedding.weight, n - old_n, mean_resizing=mean_resizing)
    keep = min(old_n, n)
    new.weight.data[:keep] = embedding.weight.data[:keep]
    embedding.weight.data = new.weight.data
    embedding.num_embeddings = n
    if embedding.padding_idx is not None and embedding.padding_idx >= n:
        embedding.padding_idx = None


def _resize_head(model: StableLmPreTrainedModel, head: nn.Linear, n: int, *, mean_resizing: bool) -> None:
    old_n, dim = head.weight.shape
    if old_n == n:  # tied to the embedding, which is resized already
        head.out_features = n
        return
    has_bias = head.bias is not None
    new = Linear(dim, n, bias=has_bias, device=head.weight.device, dtype=head.weight.dtype)
    new.use_kernels = getattr(head, "use_kernels", new.use_kernels)
    _init_new_rows(model, new, head.weight, n - old_n, mean_resizing=mean_resizing)
    if has_bias and n > old_n and mean_resizing:
        mean, std = head.bias.data.float().mean(), head.bias.data.std().float()
        new.bias.data[old_n:].normal_(mean=mean.item(), std=1e-9 * std.item())
    keep = min(old_n, n)
    new.weight.data[:keep] = head.weight.data[:keep]
    if has_bias:
        new.bias.data[:keep] = head.bias.data[:keep]
    new.requires_grad_(head.weight.requires_grad)
    model.set_output_embeddings(new)


def _resized_vocab(current: int, new_num_tokens: int | None, pad_to_multiple_of: int | None) -> int | None:
    """The size `resize_token_embeddings` goes to (None: leave the model as it is)."""
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
    ):
        # The reference's words ("not and" included), which its tests and users' code match, then ours.
        raise ValueError(
            f"Asking to pad the embedding matrix to a multiple of `{pad_to_multiple_of}`, which is not and "
            "integer. Please make sure to pass an integer: pad_to_multiple_of must be a positive integer or None."
        )
    for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if pad_to_multiple_of is None:
        return new_num_tokens
    size = current if new_num_tokens is None else new_num_tokens
    return -(-size // pad_to_multiple_of) * pad_to_multiple_of


def _init_new_rows(
    model: StableLmPreTrainedModel,
    new: nn.Module,
    old_weight: torch.Tensor,
    added: int,
    *,
    mean_resizing: bool,
) -> None:
    """Initialise the last `added` rows of `new.weight` (the rest is overwritten by the caller)."""
    if added <= 0:
        return
    if not mean_resizing:
        model._init_weights(new)
        return
    # The reference samples from N(mean, 1e-9 * covariance) of the old rows when that covariance is
    # positive definite (the new rows are then the mean, give or take 1e-9), else it uses the mean itself.
    weight = old_weight.data.float()
    mean = weight.mean(0)
    centered = weight - mean
    covariance = 1e-9 * (centered.T @ centered / weight.shape[0])
    if torch.distributions.constraints.positive_definite.check(covariance).all():
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        rows = normal.sample((added,))
    else:
        rows = mean[None, :].repeat(added, 1)
    new.weight.data[-added:] = rows.to(old_weight.dtype)
