"""Prismer's augmentation: one set of parameters reaches the RGB and every label, ids stay ids."""

from __future__ import annotations

import pytest
import torch

from trainer.augment import AugmentConfig, augment_views

BLOCK = 16
ROWS, COLS = 4, 5
SIZE = 48
RADIUS = 3  # an output pixel counts as inside a block when its (2 * RADIUS + 1)^2 window of ids is uniform
KINDS = {"rgb": "rgb", "depth": "continuous", "seg": "ids"}


def block_views() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64 x 80 frame of 4 x 5 flat blocks: rgb a random colour per block, seg a sparse id per block, depth a
    value per block. Returns the views and, per block, its id, colour and depth."""
    generator = torch.Generator().manual_seed(0)
    count = ROWS * COLS
    colours = torch.randint(0, 256, (count, 3), generator=generator, dtype=torch.uint8)
    ids = torch.arange(count, dtype=torch.uint8) * 11 + 3
    depths = torch.arange(count, dtype=torch.uint8) * 12 + 10
    block = torch.arange(ROWS).repeat_interleave(BLOCK)[:, None] * COLS + torch.arange(COLS).repeat_interleave(BLOCK)
    views = {"rgb": colours[block].permute(2, 0, 1).contiguous(), "depth": depths[block][None], "seg": ids[block][None]}
    return views, ids, colours, depths


def inside_blocks(seg: torch.Tensor) -> torch.Tensor:
    """[SIZE, SIZE] bool: pixels (not on the border) whose whole window in `seg` holds one id."""
    windows = seg[0].unfold(0, 2 * RADIUS + 1, 1).unfold(1, 2 * RADIUS + 1, 1).flatten(-2)
    uniform = (windows == windows[..., :1]).all(-1)
    inside = torch.zeros(seg.shape[-2:], dtype=torch.bool)
    inside[RADIUS:-RADIUS, RADIUS:-RADIUS] = uniform
    return inside


def assert_aligned(out: dict[str, torch.Tensor], ids: torch.Tensor, colours: torch.Tensor, depths: torch.Tensor,
                   exact_colours: bool) -> None:
    """Inside every block of the augmented seg map, depth is that block's depth (0 in the fill, where seg is 255)
    and rgb is one colour per block: the block's own colour when no photometric op can have run. (RGB in the fill
    is not checked: a photometric op between two geometric ones recolours the first fill but not the second.)"""
    inside = inside_blocks(out["seg"])
    seg, depth, rgb = out["seg"][0][inside], out["depth"][0][inside], out["rgb"][:, inside].T
    for id_value in seg.unique().tolist():
        here = seg == id_value
        if id_value == 255:
            assert (depth[here] == 0).all(), "continuous fill is not 0 where the ids were filled with 255"
        else:
            block = (ids == id_value).nonzero().item()
            assert (depth[here] == depths[block]).all(), f"depth does not follow seg id {id_value}"
            if exact_colours:
                assert (rgb[here] == colours[block]).all(), f"rgb is not the colour of block {id_value}"
            colour_spread = rgb[here].int().amax(0) - rgb[here].int().amin(0)
            assert (colour_spread <= 1).all(), f"rgb under seg id {id_value} holds several colours: not one transform"


@pytest.mark.parametrize("config", [AugmentConfig(randaugment_ops=0), AugmentConfig(),
                                    AugmentConfig(randaugment_ops=3, randaugment_magnitude=10)],
                         ids=["crop-flip", "prismer", "strong"])
def test_same_parameters_reach_rgb_and_labels(config: AugmentConfig):
    views, ids, colours, depths = block_views()
    filled = checked = 0
    for seed in range(40):
        out = augment_views(views, KINDS, SIZE, config, torch.Generator().manual_seed(seed))
        assert_aligned(out, ids, colours, depths, exact_colours=config.randaugment_ops == 0)
        filled += bool((out["seg"] == 255).any())
        checked += int(inside_blocks(out["seg"]).sum())
    assert checked > 40 * SIZE * SIZE // 10, "too few pixels inside blocks to say anything"
    if config.randaugment_ops:
        assert filled > 0, "no geometric RandAugment op ran in 40 seeds: the test did not exercise them"


def test_ids_never_take_values_that_are_not_in_the_input():
    views, ids, _, _ = block_views()
    allowed = set(ids.tolist()) | {255}
    for seed in range(40):
        out = augment_views(views, KINDS, 37, AugmentConfig(randaugment_magnitude=10), torch.Generator().manual_seed(seed))
        assert set(out["seg"].unique().tolist()) <= allowed
    assert set(augment_views(views, KINDS, 37, None)["seg"].unique().tolist()) <= set(ids.tolist())


def test_evaluation_is_a_plain_resize():
    views, _, _, _ = block_views()
    out = augment_views(views, KINDS, SIZE, None)
    assert {name: tuple(view.shape) for name, view in out.items()} == {"rgb": (3, SIZE, SIZE), "depth": (1, SIZE, SIZE),
                                                                       "seg": (1, SIZE, SIZE)}
    assert all(view.dtype == torch.uint8 for view in out.values())
    nearest = torch.nn.functional.interpolate(views["seg"][None].float(), size=(SIZE, SIZE), mode="nearest")[0]
    assert torch.equal(out["seg"], nearest.to(torch.uint8))
    bilinear = torch.nn.functional.interpolate(views["rgb"][None].float(), size=(SIZE, SIZE), mode="bilinear",
                                               antialias=True, align_corners=False)[0]
    assert (out["rgb"].float() - bilinear.round().clamp(0, 255)).abs().max() <= 1
    again = augment_views(views, KINDS, SIZE, None)
    assert all(torch.equal(again[name], view) for name, view in out.items())


def test_flip_mirrors_the_x_of_normals():
    generator = torch.Generator().manual_seed(1)
    normal = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=generator)
    rgb = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=generator)
    views, kinds = {"rgb": rgb, "normal": normal}, {"rgb": "rgb", "normal": "normal"}
    mirrored = torch.cat([255 - normal[:1], normal[1:]]).flip(-1)
    outcomes = []
    for seed in range(20):
        config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment_ops=0)
        out = augment_views(views, kinds, 24, config, torch.Generator().manual_seed(seed))
        if torch.equal(out["rgb"], rgb.flip(-1)):
            assert torch.equal(out["normal"], mirrored)
            outcomes.append("flipped")
        else:
            assert torch.equal(out["rgb"], rgb) and torch.equal(out["normal"], normal)
            outcomes.append("kept")
        no_flip = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment_ops=0, flip=False)
        out = augment_views(views, kinds, 24, no_flip, torch.Generator().manual_seed(seed))
        assert torch.equal(out["rgb"], rgb) and torch.equal(out["normal"], normal)
    assert set(outcomes) == {"flipped", "kept"}


def test_same_seed_same_bytes_and_views_do_not_change_the_draw():
    views, _, _, _ = block_views()
    outputs = [augment_views(views, KINDS, SIZE, AugmentConfig(), torch.Generator().manual_seed(seed))
               for seed in (7, 7, 8)]
    assert all(torch.equal(outputs[0][name], outputs[1][name]) for name in KINDS)
    assert not all(torch.equal(outputs[0][name], outputs[2][name]) for name in KINDS)
    alone = augment_views({"seg": views["seg"]}, {"seg": "ids"}, SIZE, AugmentConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(alone["seg"], outputs[0]["seg"])


def test_bad_input_is_refused_by_name():
    views, _, _, _ = block_views()
    with pytest.raises(ValueError, match="'depth'.*'rgb'"):
        augment_views({**views, "depth": views["depth"][:, :32]}, KINDS, SIZE, None)
    with pytest.raises(ValueError, match="unknown kind 'mask'"):
        augment_views(views, {**KINDS, "seg": "mask"}, SIZE, None)
    with pytest.raises(ValueError, match="'seg' has no kind"):
        augment_views(views, {"rgb": "rgb", "depth": "continuous"}, SIZE, AugmentConfig())
    with pytest.raises(ValueError, match="uint8"):
        augment_views({**views, "depth": views["depth"].float()}, KINDS, SIZE, None)
    with pytest.raises(ValueError, match="randaugment_magnitude"):
        augment_views(views, KINDS, SIZE, AugmentConfig(randaugment_magnitude=30))
