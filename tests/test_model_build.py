"""Building the model from every tower x LLM pairing, saving it and loading it back."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.model.builder import build_llava_model, load_vision_tower_processor
from llava.model.llava import LlavaForCausalLM
from llava.model.projector import build_projector
from llava.model.vision_tower import load_vision_tower
from tests.fixtures.models import TINY_IMAGE_SIZE, save_tiny_clip


def image_batch(model: LlavaForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample: BOS, two text tokens, an image's placeholders, four supervised tokens."""
    generator = torch.Generator().manual_seed(seed)
    num = model.num_image_tokens
    input_ids = torch.tensor([[1, 11, 12] + [IMAGE_PLACEHOLDER_ID] * num + [21, 22, 23, 24]])
    labels = input_ids.clone()
    labels[:, : 3 + num] = IGNORE_INDEX
    pixel_values = torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


@pytest.mark.parametrize("tower", ["clip", "clip_vision", "siglip", "open_clip"])
@pytest.mark.parametrize("llm", ["llama", "qwen2", "mistral"])
def test_every_pairing_builds_trains_and_round_trips(tower, llm, tiny_towers, tiny_llms, tmp_path):
    model = build_llava_model(tiny_llms[llm], tiny_towers[tower])
    batch = image_batch(model)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.num_image_tokens == 16  # 32 px / patch 8 -> 4 x 4, CLS dropped
    assert not any(p.requires_grad for p in model.vision_tower.parameters())

    model.save_pretrained(tmp_path / "saved")
    loaded = LlavaForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.vision_tower_config["tower_type"] == model.vision_tower.tower_type
    assert torch.equal(loaded(**batch).loss, loss)
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("tower", ["clip", "open_clip"])
def test_building_keeps_the_pretrained_weights(tower, tiny_towers, tiny_llama_path):
    """The model's own initialisation (post_init) leaves the loaded parts as they were."""
    from transformers import AutoModelForCausalLM

    model = build_llava_model(tiny_llama_path, tiny_towers[tower])
    expected_llm = AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()
    expected_tower = load_vision_tower(tiny_towers[tower]).state_dict()
    for name, value in model.language_model.state_dict().items():
        assert torch.equal(value, expected_llm[name]), name
    for name, value in model.vision_tower.state_dict().items():
        assert torch.equal(value, expected_tower[name]), name


def test_saved_model_loads_after_the_tower_checkpoint_is_gone(tiny_llama_path, tmp_path):
    tower_path = save_tiny_clip(str(tmp_path / "clip_that_moves"))
    model = build_llava_model(tiny_llama_path, tower_path)
    model.save_pretrained(tmp_path / "saved")
    batch = image_batch(model)
    expected = model(**batch).loss
    shutil.rmtree(tower_path)
    assert not os.path.exists(tower_path)

    loaded = LlavaForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded(**batch).loss, expected)
    assert loaded.vision_tower.image_processor.crop_size == {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
    }


@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_select_layer_picks_that_hidden_state(tiny_clip_path, select_layer):
    tower = load_vision_tower(tiny_clip_path, select_layer=select_layer, select_feature="cls_patch")
    pixels = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    hidden = tower.vision_model(pixels, output_hidden_states=True).hidden_states
    assert torch.equal(tower(pixels), hidden[select_layer])
    assert tower.num_image_tokens == 17


def test_open_clip_select_layer_matches_its_blocks(tiny_open_clip_spec):
    """Index -2 is the output of the second-to-last block, as for HF towers."""
    tower = load_vision_tower(tiny_open_clip_spec, select_layer=-2, select_feature="cls_patch")
    visual = tower.visual
    pixels = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (N, P, C)
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert torch.allclose(tower(pixels), x, atol=1e-6)


def test_tower_description_without_weights_matches_the_loaded_tower(tiny_towers):
    for spec in tiny_towers.values():
        processor, num_tokens = load_vision_tower_processor(spec)
        tower = load_vision_tower(spec)
        assert num_tokens == tower.num_image_tokens
        assert processor.to_dict() == tower.image_processor.to_dict()


def test_siglip_has_no_cls_token_to_select(tiny_siglip_path):
    with pytest.raises(ValueError, match="CLS token"):
        load_vision_tower(tiny_siglip_path, select_feature="cls_patch")


def test_unknown_select_feature_and_out_of_range_layer_are_errors(tiny_clip_path):
    with pytest.raises(ValueError, match="cls_patch"):
        load_vision_tower(tiny_clip_path, select_feature="cls")
    with pytest.raises(ValueError, match="out of range"):
        load_vision_tower(tiny_clip_path, select_layer=-5)


def test_a_language_model_is_not_a_vision_tower(tiny_llama_path):
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_vision_tower(tiny_llama_path)


def test_open_clip_tower_without_weights_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no weights"):
        load_vision_tower("open_clip:ViT-B-32")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("linear", ["weight", "bias"]),
        ("mlp2x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias"]),
        ("mlp3x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]),
        ("identity", []),
    ],
)
def test_projector_keys_match_the_original_checkpoints(name, expected):
    size = 8
    projector = build_projector(name, size, size)
    assert list(projector.state_dict()) == expected
    assert projector(torch.randn(2, 3, size)).shape == (2, 3, size)


def test_unknown_projector_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"linear, identity, mlp\{N\}x_gelu"):
        build_projector("mlp2x_relu", 4, 4)
    with pytest.raises(ValueError, match="identity projector needs equal sizes"):
        build_projector("identity", 4, 8)
