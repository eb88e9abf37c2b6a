"""Token-reducing projectors: spatial_pool{K} (average or bilinear) and pixel_shuffle{K} before a
head, joined by "+"; the image tokens the data pipeline writes follow from ImageGeometry."""

from __future__ import annotations

import pytest
import torch

from llava.data.media import ImageGeometry, TokenReduction
from llava.model.builder import (
    build_llava_model,
    load_vision_tower_processor,
)
from llava.model.llava import LlavaForCausalLM
from llava.model.projector import ReducingProjector, split_projector_type
from llava.train.arguments import parse_arguments
from llava.train.stages import plan_stage
from llava.train.throughput import flop_model_for, projector_layers, stage_grads
from llava.train.train import train
from tests.fixtures.training import training_flags
from tests.test_model_build import image_batch


@pytest.mark.parametrize(
    ("name", "reduction", "head"),
    [
        ("mlp2x_gelu", None, "mlp2x_gelu"),
        ("spatial_pool2+mlp2x_gelu", TokenReduction("spatial_pool", 2), "mlp2x_gelu"),
        (
            "spatial_pool3_bilinear+linear",
            TokenReduction("spatial_pool", 3, "bilinear"),
            "linear",
        ),
        ("pixel_shuffle2+mlp3x_gelu", TokenReduction("pixel_shuffle", 2), "mlp3x_gelu"),
    ],
)
def test_names(name, reduction, head):
    assert split_projector_type(name) == (reduction, head)


@pytest.mark.parametrize(
    "name",
    ["pixel_shuffle2", "spatial_pool1+linear", "pixel_shuffle2_bilinear+linear", "pool2+linear",
     "spatial_pool2+mlp0x_gelu", "spatial_pool2+spatial_pool2+linear"],
)  # fmt: skip
def test_unknown_names_are_refused_with_the_known_forms(name):
    with pytest.raises(ValueError, match=r"mm_projector_type|no token reduction|takes no mode"):
        split_projector_type(name)
    with pytest.raises(ValueError, match="--mm_projector_type must be one of"):
        parse_arguments(["--model_name_or_path", "m", "--mm_projector_type", name])


def grid_features(rows: int, columns: int, width: int = 3) -> torch.Tensor:
    """(1, rows * columns, width) features, row-major; feature c of cell (i, j) = 100c + 10i + j."""
    values = [
        [100 * c + 10 * i + j for c in range(width)] for i in range(rows) for j in range(columns)
    ]
    return torch.tensor([values], dtype=torch.float32)


def test_average_pooling_takes_each_windows_mean_and_a_partial_windows_own():
    features = grid_features(3, 3)
    pooled = ReducingProjector(TokenReduction("spatial_pool", 2), (3, 3), torch.nn.Identity())
    out = pooled(features)[0]  # (4, 3): the 2x2 grid of ceil(3 / 2)
    cell = {(i, j): features[0, 3 * i + j] for i in range(3) for j in range(3)}
    expected = [
        (cell[0, 0] + cell[0, 1] + cell[1, 0] + cell[1, 1]) / 4,
        (cell[0, 2] + cell[1, 2]) / 2,
        (cell[2, 0] + cell[2, 1]) / 2,
        cell[2, 2],
    ]
    torch.testing.assert_close(out, torch.stack(expected))


def test_bilinear_pooling_resizes_the_grid():
    features = grid_features(4, 4)
    pooled = ReducingProjector(
        TokenReduction("spatial_pool", 2, "bilinear"), (4, 4), torch.nn.Identity()
    )
    out = pooled(features)[0]
    # halving a linear ramp bilinearly (no corner alignment) samples it at 0.5 and 2.5
    expected = [[100 * c + 10 * i + j for c in range(3)] for i in (0.5, 2.5) for j in (0.5, 2.5)]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_pixel_shuffle_puts_each_windows_features_side_by_side():
    features = grid_features(4, 6)
    shuffled = ReducingProjector(TokenReduction("pixel_shuffle", 2), (4, 6), torch.nn.Identity())
    out = shuffled(features)[0]  # (2 * 3, 3 * 4)
    assert out.shape == (6, 12)
    for token, (i, j) in enumerate((i, j) for i in range(2) for j in range(3)):
        window = [(2 * i + di, 2 * j + dj) for di in range(2) for dj in range(2)]
        for c in range(3):  # channel c's four window cells, in row-major window order
            expected = [100 * c + 10 * r + k for r, k in window]
            assert out[token, 4 * c : 4 * c + 4].tolist() == expected


@pytest.mark.parametrize(
    ("name", "tokens"),
    [("spatial_pool2+mlp2x_gelu", 4), ("spatial_pool3_bilinear+linear", 4),
     ("pixel_shuffle2+mlp2x_gelu", 4), ("pixel_shuffle4+linear", 1)],
)  # fmt: skip
def test_a_model_with_a_reducing_projector_counts_its_tokens_everywhere(
    name, tokens, tiny_towers, tiny_llama_path, tmp_path
):
    """The model, its saved config, the count described before loading and the FLOP model
    agree; a forward, a save and a reload give the same loss."""
    model = build_llava_model(tiny_llama_path, tiny_towers["clip"], mm_projector_type=name)
    assert model.num_image_tokens == model.config.num_image_tokens == tokens  # a 4x4 grid
    assert load_vision_tower_processor(tiny_towers["clip"], "patch", name)[1] == tokens
    batch = image_batch(model)
    features = model.encode_images(batch["pixel_values"])
    assert features.shape[1] == tokens
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    model.save_pretrained(tmp_path)
    assert torch.equal(LlavaForCausalLM.from_pretrained(tmp_path)(**batch).loss, loss)
    # the FLOP model's projector linears, over its token count, are what the projector runs
    from torch.utils.flop_counter import FlopCounterMode

    tower_features = model.tower_features(batch["pixel_values"])
    with FlopCounterMode(display=False) as counter:
        model.projector(tower_features)
    layers = projector_layers(name, model.vision_tower.hidden_size, 64)
    assert counter.get_total_flops() == sum(2 * a * b * tokens for a, b in layers)
    assert flop_model_for(model.config, stage_grads(plan_stage())).image_flops > 0


def test_impossible_reductions_are_named(tiny_towers, tiny_llama_path):
    with pytest.raises(ValueError, match="4x4 patch grid does not divide by 3"):
        build_llava_model(tiny_llama_path, tiny_towers["clip"], "pixel_shuffle3+linear")
    with pytest.raises(ValueError, match="use mm_vision_select_feature 'patch', not 'cls_patch'"):
        build_llava_model(
            tiny_llama_path,
            tiny_towers["clip"],
            "spatial_pool2+linear",
            mm_vision_select_feature="cls_patch",
        )
    with pytest.raises(ValueError, match="pixel_shuffle2 expects the 4x4 patch grid's 16"):
        ReducingProjector(TokenReduction("pixel_shuffle", 2), (4, 4), torch.nn.Identity())(
            torch.zeros(1, 17, 3)
        )
    assert ImageGeometry((32, 32), 8, True, reduction=TokenReduction("spatial_pool", 3)).grid == (
        4,
        4,
    )


def test_stage_one_then_two_train_through_a_reducing_projector(training_assets, tmp_path):
    """Stage 1 trains a pixel_shuffle projector over a quarter of the tokens; stage 2 loads it
    and the data pipeline writes that many placeholders (a mismatch would fail the forward)."""
    stage_one = tmp_path / "pretrain"
    flags = training_flags(
        training_assets, stage_one,
        "--version", "plain", "--data_path", training_assets["pretrain"],
        "--tune_mm_mlp_adapter", "True", "--mm_projector_type", "pixel_shuffle2+mlp2x_gelu",
        "--save_strategy", "no",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    assert trainer.model.num_image_tokens == 4
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    flags = training_flags(
        training_assets, tmp_path / "finetune",
        "--version", "v1", "--data_path", training_assets["finetune"],
        "--mm_projector_type", "pixel_shuffle2+mlp2x_gelu",
        "--pretrain_mm_mlp_adapter", str(stage_one / "mm_projector.bin"),
        "--save_strategy", "no",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    projector = trainer.model.projector
    saved = torch.load(stage_one / "mm_projector.bin")
    assert {key.removeprefix("model.mm_projector.") for key in saved} == set(projector.state_dict())
