"""Gradient (activation) checkpointing and input-grad hooks under the reference's names: what peft's recipe
and the reference's Trainer call on a model to train adapters over frozen weights."""

from __future__ import annotations

import torch
from torch import nn


class ActivationCheckpointingMixin:
    """Part of `StableLmPreTrainedModel`: it reads `_base_model()` and `get_input_embeddings()`."""

    def enable_input_require_grads(self) -> None:
        """Make the input embedding's output require grad, so that gradients reach adapters through frozen
        layers under gradient checkpointing (peft's recipe calls this)."""

        def make_output_require_grad(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_output_require_grad)

    def disable_input_require_grads(self) -> None:
        """Remove the hook `enable_input_require_grads` added (nothing when there is none)."""
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations.

        Args:
            gradient_checkpointing_kwargs: Keyword arguments of `torch.utils.checkpoint.checkpoint`
                (default `{"use_reentrant": False}`, as the reference's).
        """
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """The reference's newer name of `gradient_checkpointing_enable` (every layer, kept on the device).

        Raises:
            ValueError: `every_n_layers` other than 1 or `offload=True`, which this package does not do.
        """
        if every_n_layers != 1 or offload:
            raise ValueError(
                "activation_checkpointing_enable supports every_n_layers=1 and offload=False only; drop them."
            )
        base = self._base_model()
        base.gradient_checkpointing = True
        base.checkpoint_kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        # As the reference: with checkpointing, the embedding output must require grad for gradients to
        # flow back through layers whose weights are frozen (reentrant checkpointing needs it).
        self.enable_input_require_grads()

    def _checkpointing_from_config(self) -> None:
        """Turn checkpointing on when the config says `gradient_checkpointing` (a key of older config.json
        files, or set on the config before building the model), and remove the key so that it is not saved,
        as the reference does."""
        config = self.config
        if not getattr(config, "gradient_checkpointing", False):
            return
        self.activation_checkpointing_enable()
        config.__dict__.pop("gradient_checkpointing", None)
        config.extra.pop("gradient_checkpointing", None)

    def gradient_checkpointing_disable(self) -> None:
        self._base_model().gradient_checkpointing = False

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._base_model().gradient_checkpointing

    is_activation_checkpointing = is_gradient_checkpointing  # the reference's newer name
