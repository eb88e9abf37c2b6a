"""ImageGeometry: the one place a composed model's image-token count is made; the towers, the
FLOP model and the export read it."""

from __future__ import annotations

import pytest

from llava.data.media import ImageGeometry
from llava.model.vision_tower import (
    build_vision_tower_from_config,
    describe_vision_tower,
    load_vision_tower,
    tower_geometry,
)
from llava.train.throughput import tower_shape


@pytest.fixture(scope="module")
def tiny_tower_configs(tiny_towers) -> dict[str, dict]:
    """kind -> the vision_tower_config a LlavaConfig stores for that tiny tower."""
    kinds = ("clip", "siglip", "open_clip")
    return {kind: load_vision_tower(tiny_towers[kind], -1).config_dict() for kind in kinds}


@pytest.mark.parametrize(
    ("size", "patch", "cls", "select", "grid", "positions", "tokens"),
    [
        ((336, 336), 14, True, "patch", (24, 24), 577, 576),  # LLaVA-1.5's CLIP-L/336
        ((336, 336), 14, True, "cls_patch", (24, 24), 577, 577),
        ((384, 384), 14, False, "patch", (27, 27), 729, 729),  # SigLIP so400m/384
        ((224, 448), 16, True, "patch", (14, 28), 393, 392),  # not square
    ],
)
def test_counts(size, patch, cls, select, grid, positions, tokens):
    geometry = ImageGeometry(size, patch, cls, select)
    assert geometry.grid == grid
    assert geometry.num_patches == grid[0] * grid[1]
    assert geometry.positions == positions
    assert geometry.num_image_tokens == tokens


def test_unknown_or_impossible_features_are_named():
    with pytest.raises(ValueError, match="Unknown mm_vision_select_feature 'cls'"):
        ImageGeometry((32, 32), 8, True, "cls")
    with pytest.raises(ValueError, match="'cls_patch' needs a tower with a CLS token"):
        ImageGeometry((32, 32), 8, False, "cls_patch")


@pytest.mark.parametrize("tower", ["clip", "siglip", "open_clip"])
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_a_saved_towers_geometry_is_the_built_towers(
    tower, select, tiny_tower_configs, tiny_towers
):
    """From a LlavaConfig's vision_tower_config alone (no weights): the same geometry as the
    tower built from it, whose features have that many tokens; the FLOP model's shape and the
    count described from the tower's checkpoint too."""
    import torch

    config = tiny_tower_configs[tower]
    if select == "cls_patch" and tower == "siglip":
        with pytest.raises(ValueError, match="needs a tower with a CLS token"):
            tower_geometry(config, select)
        return
    geometry = tower_geometry(config, select)
    built = build_vision_tower_from_config(config, select_layer=-1, select_feature=select)
    assert built.geometry == geometry
    height, width = geometry.image_size
    with torch.no_grad():
        features = built(torch.zeros(1, 3, height, width))
    assert features.shape[1] == geometry.num_image_tokens
    assert describe_vision_tower(tiny_towers[tower], select)[1] == geometry.num_image_tokens
    shape = tower_shape(config, select)
    assert (shape.num_patches, shape.positions, shape.features) == (
        geometry.num_patches,
        geometry.positions,
        geometry.num_image_tokens,
    )
