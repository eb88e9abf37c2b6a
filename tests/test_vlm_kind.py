"""transformers' image-text-to-text models as a model kind: recognised from config.json, parts
found from the structure (golden names per family), stage plans and LoRA by role, and the loss
at supervised positions equal to the model's own."""

from __future__ import annotations

import json

import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.model.builder import language_model_only, load_image_text_to_text, open_complete_model
from llava.model.image_text_to_text import (
    accepts_logits_to_keep,
    gathered_loss,
    loss_inputs,
    supervised_positions,
)
from llava.model.kinds import (
    CONNECTOR,
    HEAD,
    HF_LLAVA,
    LANGUAGE_MODEL,
    VISION,
    kind_of,
    parameter_roles,
    recognise_checkpoint,
    recognise_import,
)
from llava.train.lora import add_lora
from llava.train.stages import apply_stage, plan_stage, trainable_table
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, tiny_image

# The parts each family's structure gives, by role (the golden names: transformers' own).
EXPECTED_PARTS = {
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model"),
    "smolvlm": ("model.vision_model", "model.connector", "model.text_model"),
    "qwen2_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen2_5_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen3_5": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen3_vl": (
        "model.visual",
        ("model.visual.merger", "model.visual.deepstack_merger_list"),
        "model.language_model",
    ),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava_next": (
        "model.vision_tower",
        ("model.multi_modal_projector", "model.image_newline"),
        "model.language_model",
    ),
    "gemma4": ("model.vision_tower", "model.embed_vision", "model.language_model"),
    "paligemma": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "mllama": ("model.vision_model", "model.multi_modal_projector", "model.language_model"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "molmo2": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "fuyu": (None, "model.vision_embed_tokens", "model.language_model"),  # no vision encoder
}
FAMILIES = [family for family in VLM_FAMILIES + PROMPT_FAMILIES if family in EXPECTED_PARTS]
# The prompt-only families (no chat template) take a bare prompt, and a suffix to learn.
PROMPTS = {
    "paligemma": dict(text="<image>What is it?", suffix="A square of noise."),
    "fuyu": dict(text="What is it? Say it in a few words."),  # it writes the image itself
}


def as_names(value) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else (value,)


@pytest.fixture(scope="module")
def opened(tiny_vlm_paths):
    """family -> (model, processor), loaded once."""
    return {family: load_image_text_to_text(tiny_vlm_paths[family]) for family in FAMILIES}


def two_turn_batch(processor, family: str) -> dict[str, torch.Tensor]:
    """A one-image, two-answer conversation through the family's processor (its own ids);
    for a prompt-only family, its prompt and suffix (without the processor's labels)."""
    if family in PROMPTS:
        prompt = PROMPTS[family]
        suffix = {"suffix": [prompt["suffix"]]} if "suffix" in prompt else {}
        batch = processor(
            text=[prompt["text"]],
            images=[[tiny_image((56, 40), seed=1)]],
            return_tensors="pt",
            **suffix,
        )
        return {key: value for key, value in batch.items() if key != "labels"}
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square of noise."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Grey and red."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    bos = processor.tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    return dict(
        processor(
            text=[text],
            images=[[tiny_image((56, 40), seed=1)]],
            return_tensors="pt",
            add_special_tokens=add_special_tokens,
        )
    )


def answer_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels supervising only the last third of the sequence (a stand-in for the answers)."""
    labels = input_ids.clone()
    labels[:, : 2 * input_ids.shape[1] // 3] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_vlm_is_recognised_from_its_config(family, tiny_vlm_paths, tmp_path):
    folder = tiny_vlm_paths[family]
    if family == "llava":  # llava-hf opens as this project's composed model (test_hf_import.py)
        assert recognise_import(folder) == HF_LLAVA and recognise_checkpoint(folder) is None
    else:
        assert recognise_checkpoint(folder).name == "image-text-to-text"
    with pytest.raises(
        ValueError, match="complete vision-language model .*leave out --vision_tower"
    ):
        open_complete_model(folder, vision_tower="openai/clip-vit-large-patch14-336")
    lm_only = tmp_path / "lm"  # a causal LM's config is not a VLM: it composes with a tower
    lm_only.mkdir()
    (lm_only / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert open_complete_model(str(lm_only), vision_tower=None) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_are_found_from_the_models_structure(family, opened):
    model, _ = opened[family]
    vision, connector, language_model = EXPECTED_PARTS[family]
    assert kind_of(model).parts(model) == {
        VISION: (vision,) if vision else (),
        CONNECTOR: as_names(connector),
        LANGUAGE_MODEL: (language_model,),
        HEAD: ("lm_head",),
    }
    roles = parameter_roles(model)
    assert set(roles) == {name for name, _ in model.named_parameters()}
    for name, role in roles.items():
        if any(name == part or name.startswith(part + ".") for part in as_names(connector)):
            assert role == CONNECTOR, name


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_one_trains_only_the_connector(family, tiny_vlm_paths):
    model, _ = load_image_text_to_text(tiny_vlm_paths[family])
    apply_stage(model, plan_stage(tune_mm_mlp_adapter=True))
    connector = as_names(EXPECTED_PARTS[family][1])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {
        name
        for name, _ in model.named_parameters()
        if any(name == part or name.startswith(part + ".") for part in connector)
    }
    assert trainable == expected and expected
    table = trainable_table(model)
    for part in connector:  # the table names the parts as the model does
        assert part in table


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_goes_on_the_language_models_linears_only(family, tiny_vlm_paths):
    model, _ = load_image_text_to_text(tiny_vlm_paths[family])
    plan = plan_stage(lora_enable=True)
    apply_stage(model, plan)
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    language_model = EXPECTED_PARTS[family][2]
    adapters = [name for name, _ in wrapped.named_parameters() if "lora_" in name]
    assert adapters
    assert all(f".{language_model}." in name for name in adapters)
    roles = parameter_roles(wrapped)
    trainable = {
        roles[n] for n, p in wrapped.base_model.model.named_parameters() if p.requires_grad
    }
    assert trainable == {CONNECTOR, LANGUAGE_MODEL}  # the connector, and the adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_at_supervised_positions_equals_the_models_own(family, opened):
    model, processor = opened[family]
    model.eval()
    batch = two_turn_batch(processor, family)
    labels = answer_labels(batch["input_ids"])
    with torch.no_grad():
        own = model(**batch, labels=labels).loss
        inputs = loss_inputs(model, {**batch, "labels": labels})
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        ours = gathered_loss(outputs, labels)
        summed = gathered_loss(outputs, labels, num_items_in_batch=1)
    kept = supervised_positions(labels).shape[0]
    assert kept < labels.shape[1] - 1
    if accepts_logits_to_keep(model):  # all of 5.x; 4.55's Qwen2-VL builds every position's
        assert outputs.logits.shape[1] == kept  # the head ran only where the loss needs it
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(summed, own * count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_only_batch_still_reaches_the_trainable_image_parts(family, tiny_vlm_paths):
    """Every trainable part gets a gradient every step (zero without images): ZeRO-3 would
    otherwise step a part left out of the backward with its previous gradient again."""
    model, processor = load_image_text_to_text(tiny_vlm_paths[family])
    if not hasattr(model, "get_image_features"):
        pytest.skip(f"{family}: no get_image_features on the model (mllama: cross-attention)")
    apply_stage(model, plan_stage())
    tokenizer = processor.tokenizer
    input_ids = torch.tensor([tokenizer("plain text only", add_special_tokens=False)["input_ids"]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    labels = input_ids.clone()
    kind = kind_of(model)
    outputs = model(**kind.loss_inputs(model, {**inputs, "labels": labels}) | {"labels": None})
    loss = gathered_loss(outputs, labels)
    with_path = kind.with_image_path(model, inputs, loss, kind.image_path_inputs(model, processor))
    assert with_path.item() == loss.item()
    with_path.backward()
    connector = kind.part_modules(model)[CONNECTOR]
    grads = [p.grad for p in connector.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_a_model_without_image_features_is_refused_where_zero3_would_misstep(tiny_vlm_paths):
    """mllama's images enter by cross-attention; with trainable image parts, text-only samples
    under ZeRO-3 are refused at start (ZeRO-2, or no text-only samples, or frozen parts pass)."""
    if "mllama" not in tiny_vlm_paths:
        pytest.skip("mllama is not built on this transformers line")
    model, _ = load_image_text_to_text(tiny_vlm_paths["mllama"])
    assert not hasattr(model, "get_image_features")
    kind = kind_of(model)
    apply_stage(model, plan_stage())
    with pytest.raises(ValueError, match="no get_image_features.*use ZeRO-2"):
        kind.check_text_only_steps(model, has_text_only=True, zero3=True)
    kind.check_text_only_steps(model, has_text_only=True, zero3=False)
    kind.check_text_only_steps(model, has_text_only=False, zero3=True)
    apply_stage(model, plan_stage(freeze_mm_mlp_adapter=True))
    kind.check_text_only_steps(model, has_text_only=True, zero3=True)


def test_a_class_adapted_in_its_modeling_module_is_the_one_loaded(tiny_vlm_paths, monkeypatch):
    """optimum-habana's adapt_transformers_to_gaudi (run under --use_habana before any model is
    built) puts its subclass in the family's modeling module; loading builds that class, and it
    is still recognised as the image-text-to-text kind, its parts found the same way."""
    import sys

    import transformers

    family = next(f for f in FAMILIES if f != "llava")
    original = load_image_text_to_text(tiny_vlm_paths[family])[0]
    architecture = type(original).__name__
    module = sys.modules[type(original).__module__]
    adapted = type(f"Gaudi{architecture}", (type(original),), {})
    transformers.__dict__.pop(architecture, None)  # unbound: a lookup now sees the module's
    getattr(transformers, architecture)  # then bound at the top level before the adaptation
    monkeypatch.setattr(module, architecture, adapted)

    model, _ = load_image_text_to_text(tiny_vlm_paths[family])
    assert type(model) is adapted
    assert recognise_checkpoint(tiny_vlm_paths[family]).name == "image-text-to-text"
    assert kind_of(model).parts(model) == kind_of(original).parts(original)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_quantizes_the_language_model_alone(family, opened, tiny_vlm_paths):
    """QLoRA's BitsAndBytesConfig leaves the vision model, connector and head unquantized (they
    train, or feed what trains), as the composed model quantizes its language model alone; the
    names are the model's own parts, read before any weight is loaded."""
    transformers = pytest.importorskip("transformers")
    try:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True)
    except ImportError as error:  # 4.55 wants bitsandbytes installed for the config alone
        pytest.skip(f"BitsAndBytesConfig: {error}")
    model, _ = opened[family]
    limited = language_model_only(quantization, type(model), tiny_vlm_paths[family])
    parts = kind_of(model).parts(model)
    expected = {*parts[VISION], *parts[CONNECTOR], *parts[HEAD]}
    assert set(limited.llm_int8_skip_modules) == expected
    assert not set(parts[LANGUAGE_MODEL]) & expected
    assert quantization.llm_int8_skip_modules is None  # the given config is left as it was
