"""`normal`: Prismer's surface-normal label, (n + 1) / 2 as uint8 [3, R, R] over the shared frame.

Prismer labels normals with NNET (Bae et al., "Estimating and Exploiting the Aleatoric Uncertainty
in Surface Normal Estimation", ICCV 2021) and its ScanNet checkpoint `scannet.pt`, at 480 x 480
with ImageNet normalisation, and stores (n + 1) / 2 * 255 per channel. Two modes:

- `model` (Prismer's): NNET, rebuilt below with its parameter names and shapes, so its published
  `scannet.pt` (a state dict under "model") loads by `--model PATH`, strictly: a checkpoint that
  does not fit is refused by name, never half-loaded. The encoder is a timm
  EfficientNet (`tf_efficientnet_b5.ap_in1k`, the weights NNET started from, under the name timm
  now gives them; its weights come from the checkpoint); option `encoder` picks another one for a
  smaller network. NNET's weights are on no model hub, so there is no default download: the
  default model is the file name `scannet.pt`, and a missing file says what to do.
- `from-depth`: no network. Normals of the cached `depth` label (read as a height field) by
  finite differences, so `--expert prismer` has normals offline, and they agree with the depth
  label by construction. Needs `depth` committed first (`requires`).

`from-depth` writes n = (x, y, z) with x along image columns (right), y along image rows (down)
and z toward the viewer, so a surface facing the camera is (0, 0, 1) -> (128, 128, 255); `model`
stores NNET's camera-frame normals as it predicts them. Values are rounded, not truncated as
Prismer's float -> uint8 cast did.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts import ExpertError
from precompute.experts.labels import LabelExpert, resize_maps

MODES = ("model", "from-depth")
DEFAULT_ENCODER = "tf_efficientnet_b5.ap_in1k"
DEFAULT_CHECKPOINT = "scannet.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth")
FROM_DEPTH_REVISION = "central-differences-v1"  # bump when normals_from_depth changes its bytes
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFINE_WIDTH = 128  # NNET's per-pixel refinement MLPs
MIN_KAPPA = 0.01


# --- NNET -----------------------------------------------------------------------------------------


class NormalEncoder(nn.Module):
    """The EfficientNet NNET reads: four stage outputs (strides 2, 4, 8, 16) and the head conv.

    NNET takes EfficientNet-B5's blocks 0, 1, 2 and 4 (24, 40, 64, 176 channels) as skips and the
    2048-channel `conv_head` output (before its BatchNorm) at stride 32 as the bottleneck. timm's
    `feature_info` names those stages for any EfficientNet, so a small encoder works the same way.
    The full model is kept (as `original_model`, NNET's name) rather than timm's `features_only`
    wrapper, because the head conv is part of the network and of `scannet.pt`.
    """

    def __init__(self, name: str):
        super().__init__()
        try:
            self.original_model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as e:  # timm's "Unknown model"
            raise ExpertError(f"normal: encoder {name!r} is not a timm model: {e}") from e
        if not hasattr(self.original_model, "conv_head") or len(self.original_model.feature_info) < 5:
            raise ExpertError(f"normal: encoder {name!r} is not a timm EfficientNet "
                              "(NNET needs its conv_head and 5 feature stages)")
        skips = self.original_model.feature_info[:4]
        self.skip_blocks = [int(info["module"].split(".")[1]) for info in skips]
        self.skip_channels = [int(info["num_chs"]) for info in skips]
        self.num_features = int(self.original_model.num_features)

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        model = self.original_model
        x = model.bn1(model.conv_stem(pixels))
        skips = []
        for index, block in enumerate(model.blocks):
            x = block(x)
            if index in self.skip_blocks:
                skips.append(x)
        return skips, model.conv_head(x)


class UpSampleBN(nn.Module):
    """Upsample to the skip's size, concatenate it, two 3x3 conv + BatchNorm + LeakyReLU."""

    def __init__(self, skip_input: int, output_features: int):
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(skip_input, output_features, kernel_size=3, padding=1),
            nn.BatchNorm2d(output_features),
            nn.LeakyReLU(),
            nn.Conv2d(output_features, output_features, kernel_size=3, padding=1),
            nn.BatchNorm2d(output_features),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def refinement_head(in_channels: int) -> nn.Sequential:
    """NNET's per-pixel MLP (1x1 Conv1d) from features + the coarser prediction to 4 channels."""
    return nn.Sequential(
        nn.Conv1d(in_channels, REFINE_WIDTH, kernel_size=1), nn.ReLU(),
        nn.Conv1d(REFINE_WIDTH, REFINE_WIDTH, kernel_size=1), nn.ReLU(),
        nn.Conv1d(REFINE_WIDTH, REFINE_WIDTH, kernel_size=1), nn.ReLU(),
        nn.Conv1d(REFINE_WIDTH, 4, kernel_size=1),
    )


def normalize_prediction(out: torch.Tensor) -> torch.Tensor:
    """(x, y, z, kappa) -> unit normal and a positive concentration (kappa = elu + 1 + 0.01)."""
    normal, kappa = out[:, :3], out[:, 3:]
    normal = normal / (normal.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
    return torch.cat([normal, F.elu(kappa) + 1.0 + MIN_KAPPA], dim=1)


class NormalDecoder(nn.Module):
    """NNET's decoder at test time: U-Net up to stride 2, then predictions refined 1/8 -> 1/1.

    A 3x3 conv predicts (normal, kappa) at 1/8 resolution; three per-pixel MLPs each double the
    resolution, reading the upsampled decoder features and the upsampled previous prediction.
    (NNET trains those MLPs on uncertainty-sampled pixels; at test time it runs them on all.)
    Widths follow the encoder: the bottleneck's width, halved at each of the four upsamplings
    (2048 -> 1024, 512, 256, 128 for B5).
    """

    def __init__(self, skip_channels: list[int], features: int):
        super().__init__()
        widths = [features // 2, features // 4, features // 8, features // 16]
        self.conv2 = nn.Conv2d(features, features, kernel_size=1)
        self.up1 = UpSampleBN(features + skip_channels[3], widths[0])
        self.up2 = UpSampleBN(widths[0] + skip_channels[2], widths[1])
        self.up3 = UpSampleBN(widths[1] + skip_channels[1], widths[2])
        self.up4 = UpSampleBN(widths[2] + skip_channels[0], widths[3])
        self.out_conv_res8 = nn.Conv2d(widths[1], 4, kernel_size=3, padding=1)
        self.out_conv_res4 = refinement_head(widths[1] + 4)
        self.out_conv_res2 = refinement_head(widths[2] + 4)
        self.out_conv_res1 = refinement_head(widths[3] + 4)

    def forward(self, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        x_d1 = self.up1(self.conv2(bottleneck), skips[3])  # 1/16
        x_d2 = self.up2(x_d1, skips[2])  # 1/8
        x_d3 = self.up3(x_d2, skips[1])  # 1/4
        x_d4 = self.up4(x_d3, skips[0])  # 1/2
        out = normalize_prediction(self.out_conv_res8(x_d2))
        for features, head in ((x_d2, self.out_conv_res4), (x_d3, self.out_conv_res2), (x_d4, self.out_conv_res1)):
            features = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=True)
            previous = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
            b, _, h, w = features.shape
            out = normalize_prediction(head(torch.cat([features, previous], dim=1).flatten(2))).view(b, 4, h, w)
        return out


class NNET(nn.Module):
    """Image [B, 3, H, W] (H, W multiples of 32) -> (unit normal, kappa) [B, 4, H, W]."""

    def __init__(self, encoder: str = DEFAULT_ENCODER):
        super().__init__()
        self.encoder = NormalEncoder(encoder)
        self.decoder = NormalDecoder(self.encoder.skip_channels, self.encoder.num_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.encoder(pixels))


def checkpoint_file(model_ref: str) -> Path:
    """The checkpoint file, or the one *.pt / *.pth inside a directory."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) != 1:
            raise ExpertError(f"normal: {path} must hold exactly one .pt/.pth checkpoint, "
                              f"found {[p.name for p in found]}")
        return found[0]
    if not path.is_file():
        raise ExpertError(
            f"normal: no NNET checkpoint at {model_ref!r}. Pass NNET's {DEFAULT_CHECKPOINT} (github.com/baegwangbin/"
            "surface_normal_uncertainty) with --model PATH (--model normal=PATH beside other experts), or use "
            "mode=from-depth (--expert-opt normal.mode=from-depth: normals of the cached depth label, no weights)"
        )
    return path


def load_nnet(path: Path, encoder: str) -> NNET:
    """NNET from a torch.save'd state dict, bare or under "model" (as scannet.pt), "module." stripped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExpertError(f"normal: {path} is not a readable torch checkpoint: {e}") from e
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExpertError(f"normal: {path} holds no state dict (expected tensors, bare or under 'model')")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = NNET(encoder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ExpertError(f"normal: {path} does not fit NNET with encoder={encoder!r}: {e}") from e
    if missing or unexpected:
        raise ExpertError(
            f"normal: {path} does not fit NNET with encoder={encoder!r} ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); pass encoder=NAME, the timm "
            "EfficientNet it was trained with"
        )
    return model.eval()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


# --- from depth -----------------------------------------------------------------------------------


def normals_from_depth(depth: torch.Tensor, relief: float = 1.0) -> torch.Tensor:
    """Unit normals [B, 3, R, R] of the depth label uint8 [B, 1, R, R] read as a height field.

    The stored inverse depth is large where the scene is near, so it is a height toward the viewer.
    Scale: the label's full range (0 -> 255) rises `relief` frame widths, so a 0 -> 255 ramp across
    the frame is a 45 degree slope at relief 1, whatever R is. (The label is min-max normalised per
    image, so the true scale is unknown anyway; this fixes one, so the same depth always gives the
    same normals.) Central differences inside, one-sided at the border; n = normalize(-dh/dx,
    -dh/dy, 1) with x right and y down.
    """
    height = depth[:, 0].float() * (relief / 255)
    dh_dy, dh_dx = torch.gradient(height, spacing=1 / depth.shape[-1], dim=(-2, -1))
    return F.normalize(torch.stack([-dh_dx, -dh_dy, torch.ones_like(dh_dx)], dim=1), dim=1)


def encode_normals(normals: torch.Tensor) -> np.ndarray:
    """Unit normals [B, 3, R, R] -> (n + 1) / 2 * 255, rounded, uint8."""
    return ((normals.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class NormalExpert(LabelExpert):
    name = "normal"
    description = ("surface normals as (n+1)/2, uint8 [N, 3, R, R] (Prismer); mode=model: NNET from a local "
                   "scannet.pt (--model PATH), mode=from-depth: finite differences of the cached depth, no weights")
    default_model = DEFAULT_CHECKPOINT
    options = {**LabelExpert.options, "mode": "model", "encoder": DEFAULT_ENCODER, "input_size": 480, "relief": 1.0}
    option_help = {**LabelExpert.option_help,
                   "mode": "model (NNET from --model) or from-depth (finite differences of the cached depth, no weights)",
                   "encoder": "timm EfficientNet the NNET checkpoint was trained with (mode=model)",
                   "input_size": "square side the network sees, a multiple of 32 (mode=model)",
                   "relief": "frame widths the depth label's full range rises (mode=from-depth)"}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if self.mode not in MODES:
            raise ExpertError(f"normal: mode must be one of {list(MODES)}, got {self.mode!r}")
        input_size = int(self.config["input_size"])
        if self.mode == "model" and not (32 <= input_size <= 4096 and input_size % 32 == 0):
            raise ExpertError(f"normal: input_size must be a multiple of 32 between 32 and 4096, got {input_size}")
        if not self.config["relief"] > 0:
            raise ExpertError(f"normal: relief must be > 0, got {self.config['relief']}")

    @property
    def mode(self) -> str:
        return str(self.config["mode"])

    def requires(self) -> tuple[str, ...]:
        return ("depth",) if self.mode == "from-depth" else ()

    def load(self) -> None:
        if self.mode == "from-depth":
            self.model_id, self.revision = "from-depth", FROM_DEPTH_REVISION
            return
        path = checkpoint_file(self.model_ref)
        self.model = load_nnet(path, self.config["encoder"]).requires_grad_(False).to(self.device, self.dtype)
        self.model_id, self.revision = str(path.resolve()), file_digest(path)

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        if self.mode == "from-depth":
            params = {"resolution": r, "mode": self.mode, "relief": self.config["relief"]}
            processing = {**params, "method": "central differences of depth/255*relief, n=(-dh/dx,-dh/dy,1)"}
        else:
            params = {"resolution": r, "mode": self.mode, "encoder": self.config["encoder"],
                      "input_size": self.config["input_size"]}
            processing = {**params, "frame": "bicubic", "resize": "bilinear", "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD, "output": "full-res xyz -> bilinear to frame -> renormalised"}
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash({**processing, "encoding": "(n+1)/2*255 rounded"}),
            arrays=(ArraySpec("normal", "uint8", (3, r, r)),),
            params=params,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The frame at `input_size`, ImageNet-normalised; in from-depth mode a placeholder (pixels unused)."""
        if self.mode == "from-depth":
            return torch.zeros(1)
        pixels = torch.from_numpy(np.asarray(self.frame(image), dtype=np.float32).transpose(2, 0, 1).copy()) / 255
        size = int(self.config["input_size"])
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True)[0].clamp(0, 1)
        return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        if self.mode == "from-depth":
            depth = inputs["depth"]["depth"]
            if depth.shape[1:] != (1, self.resolution, self.resolution):
                raise ExpertError(f"normal: the cached depth is {list(depth.shape[1:])}, this run's frame is "
                                  f"[1, {self.resolution}, {self.resolution}]; use the depth feature's resolution")
            normals = normals_from_depth(torch.from_numpy(np.ascontiguousarray(depth)).to(self.device),
                                         float(self.config["relief"]))
        else:
            prediction = self.model(batch.to(self.device, self.dtype))[:, :3].float()
            normals = F.normalize(resize_maps(prediction, self.resolution), dim=1)
        return {"normal": encode_normals(normals)}
