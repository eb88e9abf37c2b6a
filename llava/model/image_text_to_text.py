"""transformers' image-text-to-text models (Qwen2-VL, SmolVLM/Idefics3, Gemma 3, Qwen3-VL, ...)
as one model kind: recognised from config.json, loaded with their own class and processor, their
parts found from the model's structure, and their loss taken only at supervised positions.

One adapter serves every family that follows transformers' conventions: a composite config
with `text_config` (and `vision_config`), the language model and the vision model as
sub-models built from those configs, a connector beside them (or, as Qwen2-VL's `merger`,
inside the vision model, where it is the part that outputs the language model's width), and
an output head. Nothing here names a family.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from llava.constants import IGNORE_INDEX


def vision_language_architectures() -> set[str]:
    """The class names AutoModelForImageTextToText maps to, on this transformers line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def image_text_to_text_architecture(config: dict[str, Any]) -> str | None:
    """The image-text-to-text class a saved config.json names, None for any other model."""
    known = vision_language_architectures()
    return next((name for name in config.get("architectures") or () if name in known), None)


def is_image_text_to_text_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers image-text-to-text class or a subclass of one
    (optimum-habana's Gaudi classes subclass the ones they adapt)."""
    known = vision_language_architectures()
    return isinstance(model, PreTrainedModel) and any(
        cls.__name__ in known for cls in type(model).__mro__
    )


def image_text_to_text_class(architecture: str) -> type:
    """The class that builds `architecture`: the one its modeling module holds now.

    Under --use_habana, GaudiTrainingArguments runs optimum-habana's
    adapt_transformers_to_gaudi before any model is built; it puts its adapted class (say
    GaudiQwen2VLForConditionalGeneration) in the family's modeling module, which the top-level
    `transformers.<architecture>` name may have been bound before. Elsewhere both are the same.
    """
    import transformers

    top_level = getattr(transformers, architecture)
    return getattr(sys.modules[top_level.__module__], architecture, top_level)


def outermost(model: nn.Module, wanted) -> list[str]:
    """Names of the modules `wanted(module)` accepts that are not inside another accepted one
    (the root excluded)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        if wanted(module):
            found.append(name)
    return found


def sub_model_for(config_class: type) -> Any:
    """A test: is a module a transformers sub-model built from a config of this class."""

    def test(module: nn.Module) -> bool:
        return isinstance(module, PreTrainedModel) and type(module.config) is config_class

    return test


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def after_the_layer_stack(module: nn.Module) -> list[str]:
    """Names of the children with parameters registered after the module's layer stack (its
    largest ModuleList): what a vision model runs on its last layer's output, Qwen2-VL's
    `merger` (and Qwen3-VL's `deepstack_merger_list`)."""
    children = list(module.named_children())
    stacks = [i for i, (_, child) in enumerate(children) if isinstance(child, nn.ModuleList)]
    if not stacks:
        return []
    last_stack = max(stacks, key=lambda i: len(children[i][1]))
    return [name for name, child in children[last_stack + 1 :] if has_parameters(child)]


def joined(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def child_names(model: nn.Module, parent: str) -> list[str]:
    """Full names of the children of the module called `parent` ("" for the root)."""
    return [joined(parent, name) for name, _ in model.get_submodule(parent).named_children()]


def structure_parts(model: PreTrainedModel) -> dict[str, tuple[str, ...]]:
    """Role -> module names, read from the model's structure (see the module docstring)."""
    from llava.model.kinds import CONNECTOR, HEAD, LANGUAGE_MODEL, VISION, module_name

    text_config = model.config.get_text_config()
    language = outermost(model, sub_model_for(type(text_config)))
    if len(language) != 1:
        raise ValueError(
            f"{type(model).__name__}: cannot find its language model (a sub-model built from "
            f"its {type(text_config).__name__}); found {language or 'none'}"
        )
    vision_config = getattr(model.config, "vision_config", None)
    vision = outermost(model, sub_model_for(type(vision_config))) if vision_config else []
    head = module_name(model, model.get_output_embeddings())
    parent = language[0].rpartition(".")[0]
    taken = set(language + vision + [head])
    connector = [
        name
        for name in child_names(model, parent)
        if name not in taken and has_parameters(model.get_submodule(name))
    ]
    connector += [  # learned parameters held by the parent itself (LLaVA-NeXT's image_newline)
        joined(parent, name)
        for name, _ in model.get_submodule(parent).named_parameters(recurse=False)
    ]
    if not connector:  # the connector ends the vision model (Qwen2-VL's merger)
        connector = [
            joined(tower, name)
            for tower in vision
            for name in after_the_layer_stack(model.get_submodule(tower))
        ]
    return {
        VISION: tuple(vision),
        CONNECTOR: tuple(connector),
        LANGUAGE_MODEL: tuple(language),
        HEAD: (head,),
    }


# -- the loss at supervised positions -------------------------------------------------------


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) the positions whose next token is supervised in any row of labels (B, T)."""
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).squeeze(1)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def loss_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The forward's inputs: without labels (the model would build its loss from all logits),
    and where the model takes `logits_to_keep`, the positions the loss needs, so the head runs
    only there. Labels go to `gathered_loss` by the trainer."""
    if "labels" in inputs and accepts_logits_to_keep(model):
        inputs = {**inputs, "logits_to_keep": supervised_positions(inputs["labels"])}
    return inputs


def gathered_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 next-token cross-entropy over the supervised positions.

    `outputs.logits` is (B, K, V) at `supervised_positions(labels)` when the forward kept only
    those (K < T), else (B, T, V). The sum is divided by `num_items_in_batch` when given (the
    supervised-token count of the accumulated batch), else by this batch's count: the model's
    own causal-LM loss, with the same reduction.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    positions = supervised_positions(labels)
    if logits.shape[1] != positions.shape[0]:  # all positions were kept
        logits = logits[:, positions]
    targets = labels[:, positions + 1]  # (B, K)
    supervised = targets != IGNORE_INDEX
    total = F.cross_entropy(logits[supervised].float(), targets[supervised], reduction="sum")
    if positions.shape[0] == 0:
        total = logits.sum() * 0.0  # keep the graph connected
    count = num_items_in_batch if num_items_in_batch is not None else supervised.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


# -- text-only batches: the image path still runs ---------------------------------------------


def blank_image_inputs(processor: Any) -> dict[str, torch.Tensor]:
    """What the processor's image processor makes of one small blank image."""
    from PIL import Image

    return dict(processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt"))


def summed(value: Any) -> torch.Tensor | None:
    """The sum of every tensor in an output (a tensor, a tuple or list, a ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value.float().sum()
    items = value.values() if isinstance(value, dict) else value
    sums = [s for s in (summed(item) for item in items or ()) if s is not None]
    return torch.stack(sums).sum() if sums else None


def image_path_of_nothing(model: nn.Module, blank_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """0 x the image features of a blank image.

    Added to a text-only batch's loss, it gives the vision model and connector a zero gradient,
    as an image batch gives them a real one: under ZeRO-3 a trainable part that takes no part in
    a step's backward is stepped with its previous gradient again (its partition of the flat
    gradient buffer is not cleared), and DDP waits for its gradient. The composed model does
    the same inside its forward (LlavaForCausalLM.image_path_dummy_output)."""
    get_features = model.get_image_features
    names = inspect.signature(get_features).parameters
    parameter = next(model.parameters())
    kwargs = {
        name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else None)
        for name, value in blank_inputs.items()
        if name in names
    }
    return 0.0 * summed(get_features(**kwargs))


def has_image_inputs(inputs: dict[str, Any]) -> bool:
    return inputs.get("pixel_values") is not None
