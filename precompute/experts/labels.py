"""What Prismer's label experts share: one pixel frame, and the conversions into stored labels.

Every label of an image (depth, normals, edges, segmentation, detection, OCR) and the `rgb`
feature itself is a map over the same frame: the whole image resized to `resolution` x
`resolution` (default 224, what Prismer trains at). Experts run their model at whatever input
size it wants, but resize their output to the frame, so all labels of one sample align pixel for
pixel and the trainer's augmentation can crop them together. The aspect ratio is not kept: a
crop inside the frame is what the trainer takes anyway, and a square frame makes every label of
every sample the same shape (dense Zarr arrays, no padding).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from precompute.experts import ExpertError
from precompute.experts.base import Expert

DEFAULT_RESOLUTION = 224
BACKGROUND_ID = 255  # instance and word maps: "no instance / no word here"


class LabelExpert(Expert):
    """An expert whose output is a per-pixel label map over the shared frame."""

    options: ClassVar[dict[str, Any]] = {"resolution": DEFAULT_RESOLUTION}
    option_help: ClassVar[dict[str, str]] = {"resolution": "side of the square label frame every label is resized to, pixels"}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if not 8 <= self.resolution <= 4096:
            raise ExpertError(f"{self.name}: resolution must be between 8 and 4096, got {self.resolution}")

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def frame(self, image: Image.Image) -> Image.Image:
        """The image as every label of it sees it."""
        return frame_image(image, self.resolution)


def frame_image(image: Image.Image, resolution: int) -> Image.Image:
    return image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)


def frame_tensor(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """`frame_image` for a uint8 [3, H, W] tensor: torch's antialiased bicubic (Pillow's filter, a =
    -0.5), rounded back to uint8. Several times faster than Pillow's resize and free of the GIL;
    its pixels differ from `frame_image`'s by at most one level (tests/test_decode_tensor.py)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    return resize(image, [resolution, resolution], interpolation=InterpolationMode.BICUBIC, antialias=True)


def resize_maps(maps: torch.Tensor, resolution: int, nearest: bool = False) -> torch.Tensor:
    """[B, C, h, w] to the frame: bilinear for continuous values, nearest for ids."""
    if maps.shape[-2:] == (resolution, resolution):
        return maps
    if nearest:
        return F.interpolate(maps, size=(resolution, resolution), mode="nearest-exact")
    return F.interpolate(maps.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)


def minmax_uint8(maps: torch.Tensor) -> np.ndarray:
    """Per-sample min-max to 0..255 (Prismer's depth and edge labels); a constant map becomes 0."""
    maps = maps.float()
    flat = maps.reshape(len(maps), -1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    high = flat.max(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    scaled = (maps - low) / (high - low).clamp_min(1e-8)
    return (scaled * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
