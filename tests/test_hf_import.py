"""llava-hf checkpoints (transformers' LlavaForConditionalGeneration) open as LlavaForCausalLM:
the same logits as transformers, the chat template kept, and export -> import -> export exact."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
)

from llava.compat import native_state_dict, save_processor
from llava.constants import IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN
from llava.data.images import process_images
from llava.data.preview import main as preview_main
from llava.export_hf import export
from llava.model.builder import build_llava_model, load_hf_llava, load_pretrained_model
from llava.model.hf_llava import hf_llava_state_dict, llava_config, llava_state_dict
from llava.model.kinds import HF_LLAVA, recognise_checkpoint, recognise_import
from llava.model.llava import LlavaForCausalLM
from llava.train.arguments import parse_arguments
from llava.train.train import train
from tests.fixtures.checkpoints import perturb
from tests.fixtures.models import (
    TEXT_SIZES,
    TINY_IMAGE_SIZE,
    VISION_SIZES,
    save_tiny_clip,
    save_tiny_llm,
)
from tests.fixtures.script_runs import common_flags
from tests.fixtures.tokenizers import SP_CHAT_TEMPLATE, save_sentencepiece_llama_tokenizer
from tests.fixtures.training import (
    logged_losses,
    logits_on_training_batch,
    run_script,
    short_run_flags,
)

VISION_CONFIGS = {
    "clip": dict(model_type="clip_vision_model", image_size=TINY_IMAGE_SIZE, patch_size=8),
    "siglip": dict(model_type="siglip_vision_model", image_size=TINY_IMAGE_SIZE, patch_size=8),
}
IMAGE_PROCESSORS = {
    "clip": lambda: CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    ),
    "siglip": lambda: SiglipImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ),
}


def tiny_hf_llava_config(tower: str, image_token_id: int, **settings) -> LlavaConfig:
    text = LlamaConfig(
        **{**TEXT_SIZES, "vocab_size": max(TEXT_SIZES["vocab_size"], image_token_id + 1)}
    )
    return LlavaConfig(
        vision_config={**VISION_CONFIGS[tower], **VISION_SIZES},
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        **settings,
    )


def save_tiny_hf_llava(
    folder: str, tower: str = "clip", **settings
) -> LlavaForConditionalGeneration:
    """A llava-hf folder as the hub has them: model, processor, tokenizer with <image>."""
    save_sentencepiece_llama_tokenizer(folder, legacy=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config = tiny_hf_llava_config(tower, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **settings)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=IMAGE_PROCESSORS[tower](),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(tower == "clip"),
        image_token=IMAGE_TOKEN,
        chat_template=SP_CHAT_TEMPLATE,
    )
    save_processor(processor, folder)
    return model


@pytest.mark.parametrize(
    "tower, settings",
    [
        ("clip", dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
        ("clip", dict(vision_feature_layer=-1, vision_feature_select_strategy="full")),
        ("siglip", dict(vision_feature_layer=-2, vision_feature_select_strategy="full")),
    ],
)
def test_a_llava_hf_checkpoint_gives_transformers_logits(tower, settings, tmp_path):
    folder = str(tmp_path / "checkpoint")  # a name that says nothing of its kind
    theirs = save_tiny_hf_llava(folder, tower, **settings)
    assert recognise_import(folder) == HF_LLAVA and recognise_checkpoint(folder) is None
    loaded = load_pretrained_model(folder)
    assert isinstance(loaded.model, LlavaForCausalLM)
    assert loaded.tokenizer.chat_template == SP_CHAT_TEMPLATE

    processor = LlavaProcessor.from_pretrained(folder)
    image = (torch.rand(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) * 255).to(torch.uint8).numpy()
    batch = processor(images=image, text="look <image> here", return_tensors="pt")
    # Each model gets its own form of the prompt: <image>'s id there, placeholders here.
    image_positions = batch["input_ids"] == theirs.config.image_token_index
    ours_ids = batch["input_ids"].masked_fill(image_positions, IMAGE_PLACEHOLDER_ID)
    assert int(image_positions.sum()) == loaded.model.num_image_tokens
    their_pixels = batch["pixel_values"]
    our_pixels = loaded.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(our_pixels, their_pixels)
    with torch.no_grad():
        their_logits = theirs(**batch).logits
        our_logits = loaded.model(input_ids=ours_ids, pixel_values=our_pixels).logits
    torch.testing.assert_close(our_logits, their_logits, rtol=1e-5, atol=1e-5)
    # A wide image is prepared as transformers' processor prepares it (cropped, not padded).
    wide = (torch.rand(TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE, 3) * 255).to(torch.uint8).numpy()
    aspect = loaded.model.config.image_aspect_ratio
    ours_wide = process_images([Image.fromarray(wide)], loaded.image_processor, aspect)
    theirs_wide = processor(images=wide, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours_wide, theirs_wide)


def test_export_import_export_is_exact(tmp_path):
    base, tower = str(tmp_path / "base"), str(tmp_path / "tower")
    save_tiny_llm(base, "llama")
    save_sentencepiece_llama_tokenizer(base, legacy=False)
    save_tiny_clip(tower)
    model = build_llava_model(base, tower)
    perturb(model.projector, 5)
    source, first, second = tmp_path / "ours", tmp_path / "first", tmp_path / "second"
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(base).save_pretrained(source)

    export(str(source), str(first))
    export(str(first), str(second))  # load_pretrained_model opens the llava-hf folder
    first_weights = load_file(first / "model.safetensors")
    second_weights = load_file(second / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    for name in ("config.json", "processor_config.json", "preprocessor_config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text())
    assert (first / "chat_template.jinja").read_text() == (
        second / "chat_template.jinja"
    ).read_text()


@pytest.mark.parametrize(
    "tower, settings, named",
    [
        ("clip", dict(vision_feature_layer=[-2, -5]), "vision_feature_layer"),
        ("clip", dict(projector_hidden_act="relu"), "projector_hidden_act"),
        ("siglip", dict(vision_feature_select_strategy="default"), "SigLIP"),
    ],
)
def test_a_config_that_does_not_map_is_refused_by_name(tower, settings, named, tmp_path):
    config = tiny_hf_llava_config(tower, 1023, **settings)
    with pytest.raises(ValueError, match=f"does not map onto LlavaForCausalLM: .*{named}"):
        llava_config(config, IMAGE_PROCESSORS[tower]())
    folder = str(tmp_path / "checkpoint")
    save_tiny_hf_llava(folder, tower, **settings)
    with pytest.raises(ValueError, match=named):
        load_hf_llava(folder)


def test_original_llava_checkpoints_are_not_taken_for_llava_hf(tmp_path):
    config = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert recognise_import(str(tmp_path)) is None


def test_weight_names_map_back_from_a_loaded_model_and_from_files(tmp_path):
    folder = str(tmp_path / "checkpoint")
    theirs = save_tiny_hf_llava(folder)
    ours, _ = load_hf_llava(folder)
    # A loaded model's names (model.vision_tower., lm_head.) go there and back unchanged.
    their_names = set(theirs.state_dict())
    assert set(hf_llava_state_dict(llava_state_dict(theirs.state_dict()))) == their_names
    # The names in the file (vision_tower., language_model.model.) are ours on this line too.
    saved = load_file(f"{folder}/model.safetensors")
    assert set(native_state_dict(ours, llava_state_dict(saved))) == set(ours.state_dict())
    with pytest.raises(KeyError, match="'image_newline'"):
        llava_state_dict({"image_newline": torch.zeros(1)})


def hf_training_flags(assets, hf_folder: str, output_dir, *extra: str) -> list[str]:
    """A short CPU stage-2 LoRA run over a llava-hf folder (no --vision_tower)."""
    lora = ["--version", "v1", "--data_path", assets["finetune"], "--lora_enable", "True"]
    lora += ["--lora_r", "4", "--lora_alpha", "8"]
    return ["--model_name_or_path", hf_folder, *short_run_flags(assets, output_dir, *lora, *extra)]


def test_lora_trains_from_a_llava_hf_folder_and_reloads_over_it(training_assets, tmp_path):
    hf_folder = str(tmp_path / "base")
    save_tiny_hf_llava(hf_folder, "clip", vision_feature_layer=-2)
    output = tmp_path / "lora"
    trainer = train(*parse_arguments(hf_training_flags(training_assets, hf_folder, output)))
    assert trainer.state.global_step == 3
    # The projector and the adapters trained over the llava-hf model's own tower and LLM.
    loaded = load_pretrained_model(str(output), model_base=hf_folder).model
    expected, actual = logits_on_training_batch(trainer, loaded)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    base = load_pretrained_model(hf_folder).model
    assert not torch.equal(base.projector[0].weight, loaded.projector[0].weight)


def test_a_vision_tower_beside_a_complete_model_is_refused(training_assets, tmp_path):
    hf_folder = str(tmp_path / "base")
    save_tiny_hf_llava(hf_folder, "clip", vision_feature_layer=-2)
    flags = hf_training_flags(
        training_assets, hf_folder, tmp_path / "out", "--vision_tower", training_assets["clip"]
    )
    with pytest.raises(
        ValueError, match="complete vision-language model .*leave out --vision_tower"
    ):
        train(*parse_arguments(flags))


@pytest.mark.slow
def test_finetune_lora_script_under_zero3_from_a_llava_hf_folder(training_assets, tmp_path):
    """VISION_TOWER= and PRETRAIN_MM_MLP_ADAPTER= leave those flags out; ZeRO-3 partitions the
    imported model's weights as it loads them."""
    hf_folder = str(tmp_path / "base")
    save_tiny_hf_llava(hf_folder, "clip", vision_feature_layer=-2)
    output = str(tmp_path / "lora")
    env = {
        "MODEL_NAME_OR_PATH": hf_folder,
        "VISION_TOWER": "",
        "PRETRAIN_MM_MLP_ADAPTER": "",
        "DATA_PATH": training_assets["finetune"],
        "IMAGE_FOLDER": training_assets["image_folder"],
        "OUTPUT_DIR": output,
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
    }
    run_script("finetune_lora.sh", env, *common_flags("lora"), log=output + ".log")
    losses = logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.05, losses
    loaded = load_pretrained_model(output, model_base=hf_folder).model
    base = load_pretrained_model(hf_folder).model
    assert not torch.equal(base.projector[0].weight, loaded.projector[0].weight)


def test_preview_takes_a_llava_hf_folder_s_image_settings(training_assets, tmp_path, capsys):
    hf_folder = str(tmp_path / "base")
    save_tiny_hf_llava(hf_folder, "clip", vision_feature_layer=-2)
    model = load_pretrained_model(hf_folder).model
    argv = ["--data_path", training_assets["finetune"], "--model_name_or_path", hf_folder]
    argv += ["--image_folder", training_assets["image_folder"], "--json", "--num", "1"]
    assert preview_main(argv) == 0
    sample = json.loads(capsys.readouterr().out.splitlines()[0])
    assert sample["input_ids"].count(IMAGE_PLACEHOLDER_ID) == model.num_image_tokens
    assert sample["pixel_values_shape"] == [1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]
