"""StableLmPreTrainedModel: what the four model classes share (initialisation, sizes, gradient
checkpointing, loading, saving, resizing the vocabulary). The modules themselves are in `model.py`."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .activation_checkpointing import ActivationCheckpointingMixin
from .attention import check_flash_attention_available
from .config import StableLmConfig

if TYPE_CHECKING:
    from .model import StableLmModel


class StableLmPreTrainedModel(ActivationCheckpointingMixin, nn.Module):
    """Shared behaviour of the four model classes: initialisation, sizes, checkpointing, loading."""

    config_class = StableLmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Capabilities, under the reference's names (tools and the reference's test mixins read them).
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = True
    _no_split_modules = ["DecoderLayer"]
    _keep_in_fp32_modules: list[str] = []
    _keep_in_fp32_modules_strict: list[str] = []
    _keys_to_ignore_on_load_missing = None
    _keys_to_ignore_on_load_unexpected = None
    _tied_weights_keys: dict[str, str] = {}
    _is_stateful = False
    accepts_loss_kwargs = False  # the causal LM takes the Trainer's num_items_in_batch; the others do not

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__()
        if not isinstance(config, StableLmConfig):
            kind = type(config)
            raise TypeError(
                f"Expected a stablelm.StableLmConfig, got {kind.__module__}.{kind.__qualname__}; build one with "
                "StableLmConfig(...), or convert transformers' with "
                "stablelm.StableLmConfig.from_dict(config.to_dict()) (from_pretrained(config=...) and "
                "from_config take transformers' as it is)."
            )
        if config.attn_implementation == "flash_attention_2":
            check_flash_attention_available()
        self.config = config
        # An instance attribute, as the reference's: peft reads it from the instance's __dict__ to record
        # the base model in adapter_config.json.
        self.name_or_path: str = config.name_or_path

    def post_init(self, *new_modules: nn.Module) -> None:
        """Initialise weights as the reference does (all of them, or only `new_modules`), then tie; a config
        holding `gradient_checkpointing: true` (older checkpoints) turns it on, as the reference does."""
        for module in new_modules or (self,):
            module.apply(self._init_weights)
        self.tie_weights()
        self._checkpointing_from_config()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when `tie_word_embeddings` is set."""
        head = self.get_output_embeddings()
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.base_model_prefix, self).embed_tokens

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        getattr(self, self.base_model_prefix, self).embed_tokens = embedding

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, *, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        excluded = (
            {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
            if exclude_embeddings
            else set()
        )
        unique = {id(p): p for p in self.parameters() if id(p) not in excluded}
        return sum(p.numel() for p in unique.values() if p.requires_grad or not only_trainable)

    @classmethod
    def from_config(
        cls,
        config: StableLmConfig,
        *,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> StableLmPreTrainedModel:
        """A new model with random weights (the reference's `from_config`, also `AutoModel*.from_config`);
        `config` may be transformers' StableLmConfig, converted."""
        config = StableLmConfig.coerce(config)
        if attn_implementation is not None:
            config = copy.deepcopy(config)
            config.attn_implementation = attn_implementation
            config.validate()
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is None:
            return cls(config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the dtype, as the reference does, not build then cast
        try:
            return cls(config)
        finally:
            torch.set_default_dtype(previous)

    _from_config = from_config  # the reference's private spelling, which its tools call

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return False  # no mixture of experts

    def init_weights(self) -> None:
        """Initialise every weight afresh as the reference does, then tie."""
        self.post_init()

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the class has `generate` (the causal LM only)."""
        return callable(getattr(cls, "generate", None))

    @property
    def tp_plan(self) -> dict[str, str]:
        """The reference's tensor-parallel plan (module pattern -> how to shard it): empty, as this package
        does not shard a model's tensors over devices."""
        return {}

    @property
    def fsdp_plan(self) -> dict[str, str]:
        """How FSDP2 shards this model (`stablelm.training.distributed.wrap`): module pattern, relative to
        this model ("*" for a layer's number) -> "free_full_weight" (its own unit, gathered for its forward
        and freed after) or "keep_full_weight" (its own unit, kept gathered until its backward). By default
        the config's `base_model_fsdp_plan` under the decoder's name, as the reference's; modules the plan
        does not name shard with the whole model."""
        plan = self.__dict__.get("_fsdp_plan_set")
        if plan is not None:
            return dict(plan)
        prefix = "" if self._base_model() is self else f"{self.base_model_prefix}."
        return {f"{prefix}{name}": style for name, style in self.config.base_model_fsdp_plan.items()}

    @fsdp_plan.setter
    def fsdp_plan(self, plan: dict[str, str] | None) -> None:
        from .training.fsdp_plan import check_plan

        self.__dict__["_fsdp_plan_set"] = check_plan(self, plan)

    @property
    def _fsdp_plan(self) -> dict[str, str]:  # the reference's private name, which its tools read
        return self.fsdp_plan

    @property
    def base_model(self) -> nn.Module:
        """The decoder under the head (the model itself for `StableLmModel`)."""
        return self._base_model()

    def get_decoder(self) -> nn.Module:
        return self._base_model()

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), as the reference counts them."""
        size = sum(p.nelement() * p.element_size() for p in self.parameters())
        if return_buffers:
            size += sum(b.nelement() * b.element_size() for b in self.buffers())
        return size

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """Switch the attention backend ("eager", "sdpa" or "flash_attention_2") of the loaded model."""
        if attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
            raise ValueError(
                f'Specified `attn_implementation="{attn_implementation}"` is not supported: use "eager", "sdpa" '
                'or "flash_attention_2".'
            )
        if attn_implementation == "flash_attention_2":
            check_flash_attention_available()
        self.config.attn_implementation = attn_implementation

    def _base_model(self) -> StableLmModel:
        return getattr(self, self.base_model_prefix, self)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        config: StableLmConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | int | None = None,
        device_map: torch.device | str | int | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        subfolder: str = "",
        variant: str | None = None,
        use_safetensors: bool | None = None,
        trust_remote_code: bool | None = None,
        low_cpu_mem_usage: bool | None = None,
        offload_folder: str | os.PathLike | None = None,
        offload_state_dict: bool | None = None,
        offload_buffers: bool = False,
        optimize: bool | None = None,
        quantization_config: object = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        **config_overrides: object,
    ) -> StableLmPreTrainedModel | tuple[StableLmPreTrainedModel, dict]:
        """Load a model from a checkpoint folder or a Hugging Face hub repo id, in eval mode.

        Reads `config.json`, `generation_config.json` (as `model.generation_config`) and the weights:
        `model.safetensors`, sharded safetensors with their index, or legacy `pytorch_model*.bin` through
        `torch.load(weights_only=True)` (refused before torch 2.6, whose check could be bypassed). Each tensor
        is read once, straight into `dtype` on `device`, and a floating-point one holding NaN or an infinity
        is refused. Tensors the checkpoint lacks (a classifier's head over a causal LM's backbone, the LM
        head over a bare backbone's checkpoint) are initialised afresh and tensors the model has no place
        for are left unread, as the reference does, with one warning naming them. A checkpoint that stores its own `lm_head.weight` although the config ties it keeps that
        head untied (and warns) unless it equals the embedding.

        Args:
            name_or_path: A local folder, or a hub repo id (only the needed files are fetched, into the hub cache).
            config: Use this config instead of the checkpoint's `config.json` (transformers' StableLmConfig is
                converted).
            dtype: "auto" or None (the checkpoint's `torch_dtype`, as the reference), a torch dtype or its name.
            torch_dtype: The reference's older spelling of `dtype`.
            device: Where the weights go: None (CPU), "auto" (CUDA when available), "cuda:0", ...
            device_map: The reference's spelling of `device`; only a single device is supported.
            attn_implementation: "sdpa" (default), "eager" or "flash_attention_2".
            revision, cache_dir, local_files_only, token, force_download: For the hub (`HF_HUB_OFFLINE=1` is
                honoured; `force_download` fetches the files again even when they are cached).
            subfolder: The folder, inside the local folder or the hub repo, that holds the files.
            variant: Read the weights saved under this variant's names, as the reference names them
                (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`, `pytorch_model.fp16.bin`).
            use_safetensors: True reads only safetensors (an error if the checkpoint has only `.bin` files),
                False only the legacy `.bin` files, None (default) safetensors where present, else `.bin`.
            trust_remote_code: Accepted for the reference's snippets and ignored: no file's code ever runs.
            low_cpu_mem_usage, offload_state_dict: Accepted and ignored, as the reference ignores them: every
                load reads one tensor at a time into the model built without memory.
            offload_folder, offload_buffers: Accepted and ignored: the model goes whole on one device, never
                partly to disk (a `device_map` asking for "disk" is refused).
            optimize: Run inference on stablelm's kernels where they serve (the default; bfloat16
                bit-identical to torch, float32 within rounding; see `stablelm.fast`). False keeps
                torch's kernels; None follows `STABLELM_OPTIMIZE` (0 turns them off).
            quantization_config: "int8", "int4", a dict or a `stablelm.QuantizationConfig`: quantize the
                linear layers (weight-only) while loading, one tensor at a time (the bf16 model is never
                held whole). A checkpoint saved quantized loads as it is without this argument; passing
                one that differs from the checkpoint's is an error. See docs/quantization.md.
            output_loading_info: Return `(model, info)`, `info` the reference's loading report: sets of
                `missing_keys` (initialised afresh), `unexpected_keys` (unread) and `mismatched_keys`
                ((key, checkpoint shape, model shape)), and `error_msgs`.
            ignore_mismatched_sizes: Initialise afresh, instead of refusing, a tensor whose shape differs from
                the model's (a classifier head loaded with another `num_labels`).
            pretrained_model_name_or_path: The reference's keyword name of `name_or_path`.
            state_dict: Weights to load instead of a checkpoint's, with `config` and no `name_or_path`
                (as the reference's `from_pretrained(None, config=..., state_dict=...)`); every key is needed.
            **config_overrides: Config fields to change, such as `num_labels=3`.

        Raises:
            FileNotFoundError: The model is neither a local folder nor on the hub, or files are missing.
            stablelm.checkpoint.CheckpointError: A file is damaged, malformed, non-finite, a link out of the
                folder, or does not fit the config (checked before the model is built); the message names the
                file and what to do.
        """
        from .checkpoint import load_pretrained

        if pretrained_model_name_or_path is not None:  # the reference's keyword name
            if name_or_path is not None:
                raise TypeError("Pass the model once: positionally or as pretrained_model_name_or_path=.")
            name_or_path = pretrained_model_name_or_path
        if torch.get_default_device().type == "meta":  # else a torch error deep inside the load
            raise RuntimeError(
                "You are using `from_pretrained` with a meta device context manager (`with torch.device('meta')`"
                "), where no weights can be read: call it outside the context manager (which suits building an "
                "empty model with the class itself)."
            )
        # Accepted for the reference's snippets: loads always go tensor by tensor onto one whole device.
        del low_cpu_mem_usage, offload_folder, offload_state_dict, offload_buffers
        if state_dict is not None:
            return cls._from_state_dict(name_or_path, config, state_dict, config_overrides)
        if name_or_path is None:
            raise TypeError("from_pretrained needs the model: a local folder or a hub repo id.")
        info: dict = {}
        model = load_pretrained(
            cls,
            name_or_path,
            config=config,
            dtype=dtype,
            torch_dtype=torch_dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            subfolder=subfolder,
            variant=variant,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
            optimize=optimize,
            quantization_config=quantization_config,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            loading_info=info,
            **config_overrides,
        )
        model.config.name_or_path = model.name_or_path = str(name_or_path)
        return (model, info) if output_loading_info else model

    @classmethod
    def _from_state_dict(
        cls, name_or_path: object, config: StableLmConfig | None, state_dict: dict, overrides: dict
    ) -> StableLmPreTrainedModel:
        if name_or_path is not None or config is None or overrides:
            raise ValueError(
                "from_pretrained(state_dict=...) loads these weights into a model built from config=...: pass "
                "no model folder and no other config fields."
            )
        model = cls(StableLmConfig.coerce(config))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        save_function: Any = None,
        variant: str | None = None,
    ) -> None:
        """Write `config.json`, `generation_config.json` (for a model that generates) and the weights.

        Safetensors (or `pytorch_model.bin` with `safe_serialization=False`) in shards of at most
        `max_shard_size` ("5GB", "500MB", "2GiB" or bytes) with an index when there are several. A tied LM
        head is left out, as the reference does. Each file is written under a temporary name and renamed;
        over an existing checkpoint the weights switch at one rename (the index after all its new shards), so
        an interrupted save leaves the old checkpoint whole, and the next save clears what it left behind.
        `state_dict` saves those tensors, under their keys (the checkpoint's names), instead of the model's,
        as the reference's option (peft, accelerate and the Trainer pass one). `is_main_process=False`
        writes nothing (the other ranks of a distributed run, as the reference). `push_to_hub`,
        `save_function` and `variant` are taken at their defaults only: uploading, another writer and
        variant file names are refused by name.
        """
        from .checkpoint import save_pretrained

        save_pretrained(
            self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
            state_dict=state_dict, is_main_process=is_main_process, push_to_hub=push_to_hub,
            save_function=save_function, variant=variant,
        )  # fmt: skip

    # ---- vocabulary size ---------------------------------------------------------------------------------
    def set_output_embeddings(self, head: nn.Linear) -> None:
        """Replace the LM head (only models that have one, such as `StableLmForCausalLM`)."""
        old = self.get_output_embeddings()
        if old is None:
            raise AttributeError(f"{type(self).__name__} has no output embeddings (LM head) to replace.")
        name = next(name for name, module in self.named_children() if module is old)
        setattr(self, name, head)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        *,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Give the input embedding (and the LM head, if any) `new_num_tokens` rows, as the reference does.

        Rows of the kept ids are unchanged, so the logits of old ids stay the same. New rows are drawn
        around the mean of the old ones (`mean_resizing=True`, the reference's default: a new token's logit
        starts at the mean of the old tokens' logits), or from N(0, initializer_range) otherwise. Shrinking
        drops the last rows. A tied LM head stays tied, and `config.vocab_size` follows, so the model
        saves and reloads at its new size.

        Args:
            new_num_tokens: The new vocabulary size, usually `len(tokenizer)` after adding tokens. None keeps
                the size (and only pads it, with `pad_to_multiple_of`).
            pad_to_multiple_of: Round the size up to a multiple of this (64 or 128 suit GPU kernels).
            mean_resizing: Initialise new rows from the old rows' mean and covariance (else from the
                config's normal initialisation).

        Returns:
            The input embedding module.
        """
        from .resize import resize_token_embeddings

        return resize_token_embeddings(
            self, new_num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing
        )
