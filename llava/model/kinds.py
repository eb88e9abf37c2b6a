"""Model kinds: how a checkpoint is recognised from its config, which class loads it, and its
parts by role (vision, connector, language model, head) for stage plans, LoRA and FLOP counts.

A kind is one entry in `MODEL_KINDS`; training code asks for parts by role and never for
attribute names, so a second kind (transformers' image-text-to-text models, say) is a new entry
here plus its tests. The composed `LlavaForCausalLM` is the one kind so far; checkpoints other
programs write (transformers' llava-hf folders) are recognised here and open as it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from llava.files import CONFIG_FILE, read_json_object
from llava.model.image_text_to_text import (
    blank_image_inputs,
    gathered_loss,
    has_image_inputs,
    image_path_of_nothing,
    image_text_to_text_architecture,
    is_image_text_to_text_model,
    loss_inputs,
    structure_parts,
)
from llava.model.llava import LlavaForCausalLM

# The roles a stage plan assigns a mode to; the head is applied after the language model, so
# that a head inside it (the composed kind's lm_head) can be set apart.
VISION, CONNECTOR, LANGUAGE_MODEL, HEAD = "vision", "connector", "language_model", "head"
ROLES = (VISION, CONNECTOR, LANGUAGE_MODEL, HEAD)
QUANTIZED_LINEARS = ("Linear8bitLt", "Linear4bit")  # bitsandbytes' replacements for nn.Linear


def unwrap_base(model: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


class PartGroup(nn.Module):
    """Several modules (or bare parameters) of a model that play one role, seen as one module:
    Qwen3-VL's connector is `visual.merger` and `visual.deepstack_merger_list`, LLaVA-NeXT's
    has the parameter `image_newline` beside its projector. It only refers to them: the
    model's own tree is unchanged, and parameters() / requires_grad_() reach them."""

    def __init__(self, members: dict[str, nn.Module | nn.Parameter]):
        super().__init__()
        for name, member in members.items():
            key = name.replace(".", "/")  # a dotted name is not a valid child name
            if isinstance(member, nn.Parameter):
                self.register_parameter(key, member)
            else:
                self.add_module(key, member)


def member(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    """The module, or else the parameter, called `name` in the model."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


class ModelKind:
    """One way a vision-language model is put together: how a saved checkpoint is recognised
    (from its config.json), which models are of it, and its parts by role.

    `parts(model)`: role -> the dotted names (from the model's root) of the modules playing it,
    for every role (a role no module plays has none). `loss_function`: None where the model's
    forward computes the supervised-only loss itself, else `(outputs, labels,
    num_items_in_batch) -> loss` over the logits the inputs of `loss_inputs` ask for.
    """

    name: str
    loss_function: Any = None
    # LoRA results list the parts trained in full as peft's modules_to_save (plain peft
    # restores them); the composed kind keeps LLaVA's non_lora_trainables.bin alone.
    adapter_holds_trained_parts: bool = False

    def recognises(self, config: dict[str, Any]) -> bool:
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def parts(self, model: nn.Module) -> dict[str, tuple[str, ...]]:
        raise NotImplementedError

    def loss_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The forward's inputs for a training or evaluation loss."""
        return inputs

    def image_path_inputs(self, model: nn.Module, processor: Any) -> dict[str, Any] | None:
        """What `with_image_path` runs on a text-only batch, made once per run (None: nothing;
        the composed kind's forward does this itself)."""
        return None

    def with_image_path(
        self, model: nn.Module, inputs: dict[str, Any], loss: torch.Tensor, path_inputs: Any
    ) -> torch.Tensor:
        """The training loss of a batch, made to reach the trainable image parts when the batch
        has no image (see image_text_to_text.image_path_of_nothing)."""
        return loss

    def part_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Role -> its module (a PartGroup where several or no modules play it)."""
        modules = {}
        for role, names in self.parts(model).items():
            members = {name: member(model, name) for name in names}
            if len(names) == 1 and isinstance(members[names[0]], nn.Module):
                modules[role] = members[names[0]]
            else:
                modules[role] = PartGroup(members)
        return modules

    def lora_target_names(self, model: nn.Module) -> list[str]:
        """The default LoRA targets: leaf names of the language model's linear layers, the
        head's excluded."""
        modules = self.part_modules(model)
        head = modules[HEAD]
        names = set()
        for name, module in modules[LANGUAGE_MODEL].named_modules():
            is_linear = isinstance(module, nn.Linear) or type(module).__name__ in QUANTIZED_LINEARS
            if is_linear and module is not head:
                names.add(name.rsplit(".", 1)[-1])
        return sorted(names)


@dataclass(frozen=True)
class ComposedKind(ModelKind):
    """A model of this project's own class, its parts at fixed names.

    `model_type`: the config's `model_type`, by which a saved checkpoint is recognised.
    `model_class`: the class whose `from_pretrained` loads a full checkpoint (in builder.py).
    `part_names`: role -> module name (dotted, from the model's root); a role left out is the
    model's output embeddings for HEAD.
    """

    model_type: str
    model_class: type[PreTrainedModel]
    part_names: dict[str, str]

    @property
    def name(self) -> str:
        return self.model_type

    def recognises(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == self.model_type

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def parts(self, model: nn.Module) -> dict[str, tuple[str, ...]]:
        names = dict(self.part_names)
        if HEAD not in names:
            names[HEAD] = module_name(model, model.get_output_embeddings())
        return {role: (names[role],) for role in ROLES}


class ImageTextToTextKind(ModelKind):
    """transformers' image-text-to-text models, every family in one adapter (see
    llava/model/image_text_to_text.py): loaded by AutoModelForImageTextToText with their own
    processor; parts from their structure; the loss only at supervised positions."""

    name = "image-text-to-text"
    loss_function = staticmethod(gathered_loss)
    adapter_holds_trained_parts = True

    def recognises(self, config: dict[str, Any]) -> bool:
        imported = any(test(config) for test in IMPORTED_FORMATS.values())
        return not imported and image_text_to_text_architecture(config) is not None

    def owns(self, model: nn.Module) -> bool:
        return is_image_text_to_text_model(model)

    def parts(self, model: nn.Module) -> dict[str, tuple[str, ...]]:
        return structure_parts(model)

    def loss_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return loss_inputs(unwrap_base(model), inputs)

    def image_parts_train(self, model: nn.Module) -> bool:
        base = unwrap_base(model)
        modules = self.part_modules(base)
        return any(
            p.requires_grad for role in (VISION, CONNECTOR) for p in modules[role].parameters()
        )

    def check_text_only_steps(self, model: nn.Module, has_text_only: bool, zero3: bool) -> None:
        """Refuse what would train silently wrong: under ZeRO-3, text-only steps need the image
        path (with_image_path), which a model without get_image_features cannot run."""
        base = unwrap_base(model)
        if has_text_only and zero3 and self.image_parts_train(base):
            if not hasattr(base, "get_image_features"):
                raise ValueError(
                    f"{type(base).__name__} has no get_image_features, so a text-only batch "
                    "leaves its trainable image parts out of the backward, which ZeRO-3 then "
                    "steps with an earlier gradient: use ZeRO-2, freeze them "
                    "(--freeze_mm_mlp_adapter True), or drop the text-only records"
                )

    def image_path_inputs(self, model, processor):
        """A blank image's inputs where image parts train and the model can encode an image
        alone (get_image_features; a model without it is refused under ZeRO-3 at start)."""
        base = unwrap_base(model)
        if not self.image_parts_train(base) or not hasattr(base, "get_image_features"):
            return None
        return blank_image_inputs(processor)

    def with_image_path(self, model, inputs, loss, path_inputs):
        if path_inputs is None or has_image_inputs(inputs):
            return loss
        return loss + image_path_of_nothing(unwrap_base(model), path_inputs).to(loss.device)


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a module of {type(model).__name__}")


MODEL_KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ComposedKind(
            model_type=LlavaForCausalLM.config_class.model_type,
            model_class=LlavaForCausalLM,
            part_names={
                VISION: "vision_tower",
                CONNECTOR: "projector",
                LANGUAGE_MODEL: "language_model",
            },
        ),
        ImageTextToTextKind(),
    )
}


def kind_of(model: nn.Module) -> ModelKind:
    """The kind of a model (possibly inside a peft wrapper)."""
    base = unwrap_base(model)
    for kind in MODEL_KINDS.values():
        if kind.owns(base):
            return kind
    raise ValueError(
        f"{type(base).__name__} is not a model kind this project knows "
        f"(known: {', '.join(MODEL_KINDS)})"
    )


def kind_for_config(config: dict[str, Any]) -> ModelKind | None:
    """The kind that recognises a saved config.json's contents, None for none."""
    for kind in MODEL_KINDS.values():
        if kind.recognises(config):
            return kind
    return None


def saved_config(folder: str) -> dict[str, Any] | None:
    """A checkpoint folder's config.json, None where it is absent or unreadable (the loaders'
    own checks name the file then)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return read_json_object(path)
    except ValueError:
        return None


def recognise_checkpoint(folder: str) -> ModelKind | None:
    """The kind of the checkpoint in `folder`, from its config.json (never its name)."""
    config = saved_config(folder)
    return None if config is None else kind_for_config(config)


# Checkpoints written by other programs that open as a kind here: name -> recognition from
# config.json (builder.IMPORTERS holds their loaders).
HF_LLAVA = "llava-hf"


def is_hf_llava_config(config: dict[str, Any]) -> bool:
    """transformers' LlavaForConditionalGeneration (llava-hf). The original LLaVA repo's
    checkpoints also say model_type 'llava', but with LlavaLlamaForCausalLM: not these."""
    architectures = config.get("architectures") or ()
    return config.get("model_type") == "llava" and "LlavaForConditionalGeneration" in architectures


IMPORTED_FORMATS = {HF_LLAVA: is_hf_llava_config}


def recognise_import(folder: str) -> str | None:
    """The name of the foreign format of the checkpoint in `folder` (from its config.json,
    never its name), None for a checkpoint of this project or an unknown one."""
    config = saved_config(folder)
    if config is None:
        return None
    return next((name for name, test in IMPORTED_FORMATS.items() if test(config)), None)


def parts_by_role(model: nn.Module) -> dict[str, nn.Module]:
    """The (un-wrapped) model's parts by role."""
    base = unwrap_base(model)
    return kind_of(base).part_modules(base)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name (in the un-wrapped model) -> the role of the innermost part holding it."""
    base = unwrap_base(model)
    parts = [(role, name) for role, names in kind_of(base).parts(base).items() for name in names]
    parts.sort(key=lambda item: -len(item[1]))
    roles = {}
    for name, _ in base.named_parameters():
        for role, prefix in parts:
            if name == prefix or name.startswith(prefix + "."):
                roles[name] = role
                break
    return roles
