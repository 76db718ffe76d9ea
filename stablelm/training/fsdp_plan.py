"""A model's FSDP plan (`model.fsdp_plan`): which modules FSDP2 shards as units of their own, and whether each
keeps its gathered weights from its forward to its backward.

The plan is the reference's (`base_model_fsdp_plan` of its configs, the same entries): the embedding and each
decoder layer are units freed after their forward ("free_full_weight"), the final norm a unit kept gathered
("keep_full_weight", its backward comes first); the rest (the head) shards with the whole model, its root unit.
Where the head shares the embedding's weight (`tie_word_embeddings`), the embedding stays in the root unit with
it, as the reference's plan resolves it: one parameter cannot lie in two units.
"""

from __future__ import annotations

import re

from torch import nn

STYLES = ("free_full_weight", "keep_full_weight")


def _pattern(key: str) -> re.Pattern:
    """A plan key ("model.layers.*") as a regular expression over module names: "*" is a layer's number."""
    return re.compile(r"\d+".join(re.escape(part) for part in key.split("*")) + r"\Z")


def check_plan(model: nn.Module, plan: dict[str, str] | None) -> dict[str, str]:
    """`plan` for `model.fsdp_plan = plan`, checked: a dict of module patterns, each naming a module of the
    model, to one of `STYLES`; None sets an empty plan (the whole model one unit)."""
    if plan is None:
        return {}
    if not isinstance(plan, dict):
        raise ValueError(f"fsdp_plan must be a dict of module pattern -> style, not {type(plan).__name__}.")
    names = [name for name, _ in model.named_modules() if name]
    for key, style in plan.items():
        if style not in STYLES:
            raise ValueError(
                f"fsdp_plan[{key!r}] = {style!r} is not a style FSDP2 is given here: use one of {', '.join(STYLES)}."
            )
        if not isinstance(key, str) or not any(_pattern(key).match(name) for name in names):
            raise ValueError(
                f"fsdp_plan names {key!r}, which matches no module of this model: use a module's name as "
                "model.named_modules() gives it, with * for a layer's number (e.g. 'model.layers.*')."
            )
    return dict(plan)


def units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """The modules `model.fsdp_plan` makes units of their own, in the model's order (children before the root
    that `wrap` shards last): (name, module, reshard after forward). An embedding whose weight the head
    shares is left to the root unit."""
    plan = getattr(model, "fsdp_plan", None) or {}
    patterns = [(_pattern(key), style) for key, style in plan.items()]
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = inputs is not None and outputs is not None and outputs.weight is inputs.weight
    found = []
    for name, module in model.named_modules():
        style = next((style for pattern, style in patterns if name and pattern.match(name)), None)
        if style is None or (tied and module is inputs):
            continue
        if any(name.startswith(f"{outer}.") for outer, _, _ in found):
            continue  # inside a unit already (a pattern that names a module and one of its children)
        found.append((name, module, style == "free_full_weight"))
    return found
