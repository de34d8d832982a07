"""Prismer's augmentation, applied with ONE set of random parameters to the RGB and every expert label.

The labels were cached at one frame and align with the RGB pixel for pixel; a crop, flip or rotation
drawn separately for a label would teach the model that depth and segments sit somewhere else than
the objects they describe. So the parameters are drawn once per sample (from the caller's generator,
so a seeded sample is reproducible) and only then applied to each view, by kind:

- "rgb", "continuous" (depth, edge), "normal": bilinear, filled with 0 where a geometric op uncovers
  the image (Prismer's fill for continuous labels).
- "ids" (segmentation classes, detection / OCR instances): NEAREST always, as a `tv_tensors.Mask`, so
  no interpolated value can become an id that does not exist in the map; filled with 255, the
  cache's "no class / no instance".
- "normal" is stored as (n + 1) / 2 * 255 per channel (x, y, z): a horizontal flip mirrors the
  surface, so x becomes 255 - x or every normal would point the wrong way. Like Prismer, the small
  rotations and shears of RandAugment move normal maps without turning the vectors.

RandAugment (N ops of the standard 14, magnitude M of 10, torchvision's ranges and random sign):
photometric ops change the RGB only; shear, translate and rotate move every view alike.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import BaseModel, Field
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from trainer.config import OPTIONS, Float, NonNegative, PositiveFloat

Fraction = Annotated[Float, Field(gt=0, le=1)]

KINDS = ("rgb", "continuous", "normal", "ids")
ID_FILL = 255

# op -> (its magnitude at `level` = M / 10 of torchvision's range, for an image of height h and width w;
# whether its sign is random)
RANDAUGMENT_OPS = {
    "Identity": (lambda level, h, w: 0.0, False),
    "ShearX": (lambda level, h, w: 0.3 * level, True),
    "ShearY": (lambda level, h, w: 0.3 * level, True),
    "TranslateX": (lambda level, h, w: 150.0 / 331.0 * w * level, True),
    "TranslateY": (lambda level, h, w: 150.0 / 331.0 * h * level, True),
    "Rotate": (lambda level, h, w: 30.0 * level, True),
    "Brightness": (lambda level, h, w: 0.9 * level, True),
    "Color": (lambda level, h, w: 0.9 * level, True),
    "Contrast": (lambda level, h, w: 0.9 * level, True),
    "Sharpness": (lambda level, h, w: 0.9 * level, True),
    "Posterize": (lambda level, h, w: float(round(8 - 4 * level)), False),
    "Solarize": (lambda level, h, w: 1.0 - level, False),
    "AutoContrast": (lambda level, h, w: 0.0, False),
    "Equalize": (lambda level, h, w: 0.0, False),
}
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class AugmentConfig(BaseModel):
    """Prismer's training augmentation (RandomResizedCrop, flip, RandAugment(N=2, M=5)); typed and
    ranged when made, as `model.augment.*` of `trainer fit --method prismer`."""

    model_config = OPTIONS

    # YAML gives a pair as a list: the pairs take one (strict=False), their numbers stay strict
    crop_scale: tuple[Fraction, Fraction] = Field(
        (0.5, 1.0), strict=False, description="RandomResizedCrop: the crop's area as a fraction of the image, (min, max)")
    crop_ratio: tuple[PositiveFloat, PositiveFloat] = Field(
        (3 / 4, 4 / 3), strict=False, description="RandomResizedCrop: the crop's width / height, (min, max)")
    flip: bool = Field(True, description="horizontal flip; data whose text says left / right must turn it off")
    randaugment_ops: NonNegative = Field(2, description="RandAugment: ops applied per sample")
    randaugment_magnitude: int = Field(5, ge=0, le=10, description="RandAugment: magnitude 0..10 (the paper's scale)")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _crop_box(height: int, width: int, config: AugmentConfig, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), torchvision's algorithm on our generator."""
    log_ratio = (math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    for _ in range(10):
        area = height * width * _uniform(*config.crop_scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    if width / height < min(config.crop_ratio):
        w, h = width, round(width / min(config.crop_ratio))
    elif width / height > max(config.crop_ratio):
        w, h = round(height * max(config.crop_ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _geometric(view: torch.Tensor, op: str, magnitude: float, interpolation: InterpolationMode, fill: int) -> torch.Tensor:
    """torchvision RandAugment's geometric ops (shears about the corner, as there)."""
    if op == "Rotate":
        return F.rotate(view, angle=magnitude, interpolation=interpolation, fill=fill)
    shear = math.degrees(math.atan(magnitude))
    shear_xy = {"ShearX": [shear, 0.0], "ShearY": [0.0, shear]}.get(op, [0.0, 0.0])
    translate = {"TranslateX": [int(magnitude), 0], "TranslateY": [0, int(magnitude)]}.get(op, [0, 0])
    center = [0, 0] if op.startswith("Shear") else None
    return F.affine(view, angle=0.0, translate=translate, scale=1.0, shear=shear_xy, interpolation=interpolation,
                    fill=fill, center=center)


def _photometric(rgb: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    factor = 1.0 + magnitude
    ops = {"Brightness": lambda: F.adjust_brightness(rgb, factor), "Color": lambda: F.adjust_saturation(rgb, factor),
           "Contrast": lambda: F.adjust_contrast(rgb, factor), "Sharpness": lambda: F.adjust_sharpness(rgb, factor),
           "Posterize": lambda: F.posterize(rgb, int(magnitude)), "Solarize": lambda: F.solarize(rgb, 255.0 * magnitude),
           "AutoContrast": lambda: F.autocontrast(rgb), "Equalize": lambda: F.equalize(rgb), "Identity": lambda: rgb}
    return ops[op]()


def _check(views: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
    if not views:
        raise ValueError("augment_views: no views given")
    first, frame = next(iter(views)), tuple(next(iter(views.values())).shape[-2:])
    for name, view in views.items():
        if name not in kinds:
            raise ValueError(f"augment_views: view {name!r} has no kind (give kinds[{name!r}], one of {KINDS})")
        if kinds[name] not in KINDS:
            raise ValueError(f"augment_views: view {name!r} has unknown kind {kinds[name]!r}, expected one of {KINDS}")
        if view.dtype != torch.uint8 or view.ndim != 3:
            raise ValueError(f"augment_views: view {name!r} must be uint8 [C, H, W], got {view.dtype} {tuple(view.shape)}")
        if kinds[name] == "normal" and view.shape[0] != 3:
            raise ValueError(f"augment_views: normal view {name!r} must have 3 channels (x, y, z), got {view.shape[0]}")
        if tuple(view.shape[-2:]) != frame:
            raise ValueError(f"augment_views: view {name!r} is {tuple(view.shape[-2:])} but {first!r} is {frame}; "
                             "all views must share one frame")


def augment_views(views: dict[str, torch.Tensor], kinds: dict[str, str], size: int,
                  config: AugmentConfig | None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """uint8 [C, H, W] views of one frame -> uint8 [C, size, size] each; `config=None` is evaluation (resize only)."""
    _check(views, kinds)
    is_ids = {name: kinds[name] == "ids" for name in views}
    wrapped = {name: tv_tensors.Mask(view) if is_ids[name] else tv_tensors.Image(view) for name, view in views.items()}
    interpolation = {name: InterpolationMode.NEAREST if is_ids[name] else InterpolationMode.BILINEAR for name in views}
    fill = {name: ID_FILL if is_ids[name] else 0 for name in views}
    if config is None:
        return {name: F.resize(view, [size, size], interpolation=interpolation[name]).as_subclass(torch.Tensor)
                for name, view in wrapped.items()}
    height, width = next(iter(views.values())).shape[-2:]
    top, left, h, w = _crop_box(height, width, config, generator)
    out = {name: F.resized_crop(view, top, left, h, w, [size, size], interpolation=interpolation[name], antialias=True)
           for name, view in wrapped.items()}
    if config.flip and torch.rand((), generator=generator).item() < 0.5:
        out = {name: F.horizontal_flip(view) for name, view in out.items()}
        for name in (name for name in out if kinds[name] == "normal"):
            out[name][0] = 255 - out[name][0]
    names = list(RANDAUGMENT_OPS)
    for _ in range(config.randaugment_ops):
        op = names[int(torch.randint(len(names), (), generator=generator))]
        magnitude_at, signed = RANDAUGMENT_OPS[op]
        magnitude = magnitude_at(config.randaugment_magnitude / 10, size, size)
        if signed and torch.rand((), generator=generator).item() < 0.5:
            magnitude = -magnitude
        if op in GEOMETRIC_OPS:
            out = {name: _geometric(view, op, magnitude, interpolation[name], fill[name]) for name, view in out.items()}
        else:
            out.update({name: _photometric(view, op, magnitude) for name, view in out.items() if kinds[name] == "rgb"})
    return {name: view.as_subclass(torch.Tensor) for name, view in out.items()}
