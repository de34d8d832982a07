"""Augmented views: V seeded augmentations of each sample, encoded and stored beside the clean feature.

The papers train on a fresh augmentation every time a sample is seen; a cache stores features, so
whatever augmentation went into them is fixed. An expert's `views=V` option (default 0) stores,
next to its clean array (`cls` [K, D] or `pooled` [D] per sample), an array `views` [V, *clean shape]:
the same encoder over V augmented copies of the sample, so a trainer can draw one of the V + 1
per epoch (`model.views=true`; trainer/data.py) and evaluation keeps reading the clean one. V views
cost V + 1 forward passes and V + 1 times the storage, and give V + 1 fixed augmentations, not the
endless variety of online ones.

Each expert augments the way the paper that uses it trains:

- `ast-cls`: AST's SpecAugment on the fbank (`decode_media.mask_fbank`; the expert's `freqm` / `timem`).
- `vit-cls`, `image-pooled`: eP-ALM's image recipe, from its VQA / caption dataset code
  (`dataset/vqa.py`, ALBEF's): RandomResizedCrop to the model's input size, scale 0.5-1, bicubic;
  horizontal flip; RandAugment with 2 ops at magnitude 7 of 10 over ALBEF's ten ops (Identity,
  AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate: no colour,
  contrast, posterize or solarize, which would change what an image shows). torchvision.transforms.v2
  draws and applies them on the uint8 tensor, with torchvision's op ranges at 7/10 of their
  maximum (`num_magnitude_bins=11`); the crop then goes through the model's own normalisation.
- `timesformer-cls`: eP-ALM's video recipe (`dataset/video_vqa.py`): the same crop and flip, then
  torchvision's RandAugment with its defaults (2 ops, magnitude 9 of 31, all 14 ops), applied to the
  clip's frame stack at once, so every frame of a view gets the same crop, flip and ops; then the
  checkpoint's image processor without its resize and crop.

Reruns write the same bytes: each view's draw is seeded by the expert's `seed`, a digest of the
sample's content (its pixels or samples, which the expert sees, where the sample key is not) and
the view's index, never by a global stream, so a resumed or re-run shard, or the same image in
another split, gets the same views; and a cache with V views holds the first V of any larger V.
torchvision draws from torch's global generator, so a draw holds a lock and forks that generator:
decode threads augmenting side by side cannot interleave their draws.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from cache_schema import VIEWS_ARRAY, ArraySpec, FeatureSpec
from precompute.experts import ExpertError
from precompute.experts.base import PIXELS, timm_tensor_transform, uint8_tensor

VIEWS_HELP = "augmented copies stored per sample beside the clean feature (0: none)"
VIEW_SEED_HELP = "seed of the views' draws (with each sample's digest: a rerun writes the same bytes)"
# eP-ALM's image RandAugment (ALBEF's RandomAugment(2, 7, augs=[...])): its ops, all in torchvision's set
EPALM_IMAGE_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                   "TranslateY", "Rotate")
CROP = {"scale": (0.5, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bicubic", "antialias": True}
IMAGE_RECIPE: dict[str, Any] = {
    "source": "eP-ALM dataset/vqa.py train_transform", "RandomResizedCrop": CROP, "RandomHorizontalFlip": 0.5,
    "RandAugment": {"num_ops": 2, "magnitude": 7, "num_magnitude_bins": 11, "ops": list(EPALM_IMAGE_OPS)},
}
VIDEO_RECIPE: dict[str, Any] = {
    "source": "eP-ALM dataset/video_vqa.py train_transform, one draw per clip", "RandomResizedCrop": CROP,
    "RandomHorizontalFlip": 0.5, "RandAugment": {"num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31, "ops": "all"},
}
_DRAW_LOCK = threading.Lock()


class EpalmImageRandAugment(v2.RandAugment):
    """torchvision's RandAugment restricted to eP-ALM's image ops (`EPALM_IMAGE_OPS`)."""

    _AUGMENTATION_SPACE = {op: space for op, space in v2.RandAugment._AUGMENTATION_SPACE.items() if op in EPALM_IMAGE_OPS}


def check_views(expert: str, views: int) -> None:
    """Refuse a negative count on the driver, before anything loads."""
    if views < 0:
        raise ExpertError(f"{expert}: views must be at least 0, got {views}")


def content_digest(data: np.ndarray | torch.Tensor) -> int:
    """64 bits of the sample's content: with the expert's seed, what seeds its views."""
    array = data.numpy() if isinstance(data, torch.Tensor) else data
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).digest(), "little")


def augmentation(recipe: dict[str, Any], size: Sequence[int]) -> v2.Compose:
    """`recipe` (IMAGE_RECIPE or VIDEO_RECIPE) as torchvision v2 transforms to a `size` (h, w) crop."""
    randaugment = recipe["RandAugment"]
    rand_augment = EpalmImageRandAugment if randaugment["ops"] != "all" else v2.RandAugment
    return v2.Compose([
        v2.RandomResizedCrop(list(size), scale=CROP["scale"], ratio=CROP["ratio"],
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=CROP["antialias"]),
        v2.RandomHorizontalFlip(recipe["RandomHorizontalFlip"]),
        rand_augment(num_ops=randaugment["num_ops"], magnitude=randaugment["magnitude"],
                     num_magnitude_bins=randaugment["num_magnitude_bins"]),
    ])


def draw_views(pixels: torch.Tensor, augment: v2.Compose, views: int, seed: int) -> list[torch.Tensor]:
    """`views` augmentations of uint8 `pixels` [..., 3, H, W] (leading axes, such as a clip's frames,
    share each draw), view i seeded by (`seed`, the pixels' digest, i)."""
    digest = content_digest(pixels)
    drawn = []
    for view in range(views):
        state = np.random.SeedSequence([seed, digest, view]).generate_state(1, np.uint64)[0]
        with _DRAW_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state))
            drawn.append(augment(pixels))
    return drawn


def views_spec(spec: FeatureSpec, views: int) -> FeatureSpec:
    """`spec` (one clean array) plus the array `views` [views, *clean shape] of the same dtype, and
    `views` in its params; with no views, `spec` as it is (a cache made before views existed still matches)."""
    if not views:
        return spec
    (clean,) = spec.arrays
    return replace(spec, params={**spec.params, "views": views},
                   arrays=(clean, ArraySpec(VIEWS_ARRAY, clean.dtype, (views, *clean.shape))))


def predict_views(predict: Callable[[torch.Tensor], dict[str, np.ndarray]], batch: torch.Tensor, array: str,
                  views: int) -> dict[str, np.ndarray]:
    """`predict` over a batch whose samples are [1 + views, ...] (the clean input first, as
    `preprocess` stacks them): one forward over every input, split into `array` and `views`."""
    if not views:
        return predict(batch)
    out = predict(batch.flatten(0, 1))[array]
    out = out.reshape(*batch.shape[:2], *out.shape[1:])
    return {array: out[:, 0], VIEWS_ARRAY: out[:, 1:]}


class TimmImageViews:
    """The input side of the timm image experts (`vit-cls`, `image-pooled`): timm's eval transform of
    the clean image (`timm_tensor_transform`) and, with `views`, eP-ALM's image recipe cropped to the
    model's input size and normalised as the model's own transform does. A mixin: it sits before the
    `Expert` base class and uses its `config`, `name` and `load_frozen_timm`."""

    name: str
    config: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_views(self.name, self.views)

    @property
    def views(self) -> int:
        # a subclass that takes no `views` option (vit-avg-cls) has none
        return self.config.get("views", 0)

    def load_transforms(self, model: torch.nn.Module) -> None:
        from timm.data import resolve_data_config

        self.data_config = resolve_data_config({}, model=model)
        self.transform = timm_tensor_transform(self.data_config)
        self.normalise = timm_tensor_transform(self.data_config, resize=False)
        self.augment = augmentation(IMAGE_RECIPE, self.data_config["input_size"][1:])

    def preprocessing(self) -> dict[str, Any]:
        """What decides the inputs, for the spec's preprocessing hash (unchanged when there are no views)."""
        preprocessing: dict[str, Any] = {"data_config": self.data_config, "pixels": PIXELS}
        if self.views:
            preprocessing["views"] = {"views": self.views, "seed": self.config["seed"], "recipe": IMAGE_RECIPE,
                                      "rule": "precompute/experts/views.py: draw_views, seeded by seed + pixels digest + view"}
        return preprocessing

    def preprocess(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """uint8 [3, H, W] (or a decoded image) -> [3, S, S], or with views [1 + views, 3, S, S]: the
        clean input, then the augmented ones."""
        pixels = uint8_tensor(image)
        clean = self.transform(pixels)
        if not self.views:
            return clean
        drawn = draw_views(pixels, self.augment, self.views, self.config["seed"])
        return torch.stack([clean, *(self.normalise(view) for view in drawn)])
