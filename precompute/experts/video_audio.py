"""`timesformer-cls`, `ast-cls` and `vit-avg-cls`: eP-ALM's video and audio sides.

eP-ALM gives its frozen LM the same thing for every modality: the [CLS] token of each of the last
K encoder layers, after the encoder's final LayerNorm. `vit-cls` stores it for images; these
experts store it, float16 [N, K, D] under array "cls" with the same spec params, for the
encoders eP-ALM uses for video (TimeSformer, divided space-time attention, Kinetics-600) and
audio (AST, AudioSet), so the trainer reads any of them unchanged.

- Clips come from the source: `load_video` samples `num_frames` frames (8 for QA, 16 for
  captioning; segment sampling, `uniform` or seeded `random`, as `decode_media` describes) and
  `load_audio` gives a 16 kHz mono waveform. A source with neither, or a clip that cannot be
  decoded, is silent or too short, raises MediaError: a recorded gap, never a crash.
- TimeSformer's frames are prepared as the checkpoint's own image processor does
  (`preprocessor_config.json`, a VideoMAEImageProcessor: shortest edge resize, centre crop,
  rescale, its mean/std). A checkpoint without one gets the config's image_size with ImageNet's
  mean/std, the defaults of transformers' TimesformerVideoProcessor; `params["image_processor"]`
  says which was used.
- Frame counts: the original TimeSformer (and eP-ALM's copy of it) takes T from its input and
  nearest-interpolates the time embeddings when T differs from training. transformers'
  embeddings interpolate the same way, but its layers split the token sequence by
  `config.num_frames`, so another count runs without error and attends across the wrong tokens.
  The expert sets the loaded model's `config.num_frames` to the count it feeds, which makes the
  transformers model compute what the original does.
- AST reads transformers' `ASTFeatureExtractor` (the AST recipe: Kaldi log-mel, AudioSet mean/std) at the
  checkpoint's max_length x num_mel_bins (1024 x 128); a checkpoint whose feature extractor
  normalises otherwise (AST's Speech Commands models) is refused, not fed wrong inputs. Its sequence starts with [CLS] and then a
  distillation token (DeiT); its pooler averages the two, but eP-ALM takes position 0, the [CLS],
  and so do we.
- Augmented views (precompute/experts/views.py). `views=V` (default 0) stores, besides the clean
  [CLS] stack, V augmented ones per clip (array "views", [N, V, K, D]), which the trainer draws on
  (`model.views=true` in eP-ALM). AST's are SpecAugment masks (`freqm` 48 / `timem` 192, AST's
  AudioSet settings); TimeSformer's are eP-ALM's video recipe, one crop, flip and RandAugment draw
  per clip view, shared by its frames. Both are seeded by the clip's content and `seed`, so a
  re-run or resumed run writes the same bytes.
- `vit-avg-cls` is the baseline that ignores time: the `vit-cls` of each frame (same timm model,
  transform and levels), averaged over the frames in float32. It averages the per-frame float16
  rows, so it equals the mean of what `vit-cls` would store for the frames as images.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import (
    ASTFeatureExtractor,
    ASTModel,
    AutoConfig,
    AutoImageProcessor,
    PreTrainedModel,
    TimesformerModel,
    VideoMAEImageProcessor,
)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cache_schema import FeatureSpec, config_hash, model_revision
from precompute import decode_media
from precompute.decode import MediaError
from precompute.experts import ExpertError
from precompute.experts.base import PIXELS, PROCESSOR_CONFIG, has_processor_config, pretrained_source
from precompute.experts.views import (
    VIDEO_RECIPE,
    VIEWS_HELP,
    augmentation,
    check_views,
    content_digest,
    draw_views,
    predict_views,
    views_spec,
)
from precompute.experts.vit_cls import ClsLevelsExpert, VitClsExpert
from precompute.sources import Sample, Source

SAMPLE_RATE = 16000  # what AST was trained on, and what its feature extractor insists on
FRAME_OPTIONS: dict[str, Any] = {"num_frames": 8, "sampling": "uniform", "seed": 0}
FRAME_HELP: dict[str, str] = {
    "levels": "how many of the encoder's last layers give a [CLS] token (eP-ALM: 6)",
    "num_frames": "frames per clip, one per equal segment",
    "sampling": "uniform (each segment's middle frame) or random (a seeded frame per segment)",
    "seed": "seed of sampling=random",
}
# The image processor fields that decide the pixels (the rest of its config is bookkeeping).
PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std")


def check_frame_options(expert: str, config: dict[str, Any]) -> None:
    """Refuse bad frame options on the driver, before they would make every sample a gap."""
    if config["num_frames"] < 1:
        raise ExpertError(f"{expert}: num_frames must be at least 1, got {config['num_frames']}")
    if config["sampling"] not in decode_media.SAMPLINGS:
        raise ExpertError(f"{expert}: sampling must be one of {', '.join(decode_media.SAMPLINGS)}, "
                          f"got {config['sampling']!r}")


def read_frames(expert: str, config: dict[str, Any], source: Source, sample: Sample) -> np.ndarray:
    """The sample's frames, uint8 [T, H, W, 3], sampled as the expert's options say."""
    load_video = getattr(source, "load_video", None)
    if load_video is None:
        raise MediaError(f"{expert} reads video, but source '{source.name}' holds no videos (it has no load_video)")
    return load_video(sample, config["num_frames"], seed=config["seed"], sampling=config["sampling"])


def frame_sampling(config: dict[str, Any]) -> dict[str, Any]:
    return {"num_frames": config["num_frames"], "sampling": config["sampling"], "seed": config["seed"],
            "rule": "decode_media.decode_video: one frame per segment; short clips repeat frames in order"}


def load_encoder(expert: str, model_class: type[PreTrainedModel], model_ref: str, source: str) -> PreTrainedModel:
    """`model_class` from `source` (`pretrained_source` of `model_ref`: a hub id or local
    `save_pretrained` directory; a checkpoint with a task head, such as the hub's video / audio
    classifiers, loads its encoder)."""
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type == model_class.config_class.model_type:
            return model_class.from_pretrained(source)
    except (OSError, ValueError) as e:
        hint = "" if Path(source).is_dir() else " (offline? pass --model DIR holding a save_pretrained copy)"
        raise ExpertError(f"{expert}: could not load a {model_class.__name__} from {model_ref!r}{hint}: {e}") from e
    raise ExpertError(f"{expert}: {model_ref} is a {model_type!r} model; this expert runs "
                      f"{model_class.config_class.model_type!r} ({model_class.__name__})")


class EncoderClsExpert(ClsLevelsExpert):
    """What `timesformer-cls` and `ast-cls` share: a transformers encoder run with
    `output_hidden_states`, whose per-layer token 0 goes through the model's final `layernorm`."""

    model_class: ClassVar[type[PreTrainedModel]]

    def load_encoder(self) -> None:
        self.model_source = pretrained_source(self.name, self.model_ref)
        self.model = load_encoder(self.name, self.model_class, self.model_ref, self.model_source)
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.model_id, self.revision = model_revision(self.model_ref)
        self.select_levels(self.model.config.num_hidden_layers)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        hidden_states = self.model(batch.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        # hidden_states[0] is the embeddings; hidden_states[i + 1] is what layer i outputs.
        cls_per_level = torch.stack([hidden_states[layer + 1][:, 0] for layer in self.layers], dim=1)
        return {"cls": self.model.layernorm(cls_per_level).to(torch.float16).cpu().numpy()}


class TimesformerClsExpert(EncoderClsExpert):
    name = "timesformer-cls"
    description = ("per-layer [CLS] of a frozen transformers TimesformerModel after its final LayerNorm over "
                   "num_frames sampled frames, float16 [N, K, D] (eP-ALM's video side)")
    default_model = "facebook/timesformer-base-finetuned-k600"
    model_class = TimesformerModel
    options = {"levels": 6, **FRAME_OPTIONS, "views": 0}
    option_help = {**FRAME_HELP, "views": VIEWS_HELP, "seed": "seed of sampling=random and of the views' draws"}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        check_frame_options(self.name, self.config)
        check_views(self.name, self.config["views"])

    def load(self) -> None:
        self.load_encoder()
        config = self.model.config
        self.trained_num_frames = config.num_frames
        config.num_frames = self.config["num_frames"]  # what the layers split tokens by; see the module docstring
        if has_processor_config(self.model_source):
            self.processor_origin = "checkpoint"
            try:
                self.processor: ImageProcessingMixin = AutoImageProcessor.from_pretrained(self.model_source)
            except (OSError, ValueError) as e:
                raise ExpertError(f"{self.name}: {self.model_ref}: unreadable {PROCESSOR_CONFIG}: {e}") from e
        else:
            self.processor_origin = "imagenet-default"
            side = config.image_size
            self.processor = VideoMAEImageProcessor(size={"shortest_edge": side},
                                                    crop_size={"height": side, "width": side},
                                                    image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
        self.augment = augmentation(VIDEO_RECIPE, (config.image_size, config.image_size))
        expected = (config.num_frames, config.num_channels, config.image_size, config.image_size)
        made = tuple(self.preprocess(np.zeros((config.num_frames, 3 * config.image_size, 2 * config.image_size, 3),
                                              np.uint8)).shape[-4:])
        if made != expected:
            raise ExpertError(f"{self.name}: the image processor of {self.model_ref} makes frames {made[1:]}, but the "
                              f"model's layers assume {expected[1:]} (config.image_size); a processor that does not "
                              "crop to it cannot be used")

    def spec(self, feature: str) -> FeatureSpec:
        pixels = {k: v for k, v in self.processor.to_dict().items() if k in PROCESSOR_FIELDS}
        time_embeddings = ("as trained" if self.config["num_frames"] == self.trained_num_frames
                           else f"nearest-interpolated from {self.trained_num_frames}")
        preprocessing = {"frames": frame_sampling(self.config), "image_processor": pixels,
                         "time_embeddings": time_embeddings}
        views = self.config["views"]
        if views:
            preprocessing["views"] = {"views": views, "seed": self.config["seed"], "recipe": VIDEO_RECIPE,
                                      "rule": "precompute/experts/views.py: draw_views over the frame stack, seeded by "
                                              "seed + frames digest + view; then the image processor without resize or crop"}
        spec = self.cls_spec(
            feature, preprocessing,
            self.model.config.hidden_size, num_frames=self.config["num_frames"], sampling=self.config["sampling"],
            trained_num_frames=self.trained_num_frames, image_processor=self.processor_origin,
        )
        return views_spec(spec, views)

    def read_input(self, source: Source, sample: Sample) -> np.ndarray:
        return read_frames(self.name, self.config, source, sample)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, S, S], as the image processor prepares one video; with
        views [1 + views, T, 3, S, S]: the clean clip, then the augmented ones (already cropped to S,
        so the processor only rescales and normalises them)."""
        clean = self.processor(list(frames), return_tensors="pt")["pixel_values"][0]
        if not self.config["views"]:
            return clean
        stack = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        drawn = draw_views(stack, self.augment, self.config["views"], self.config["seed"])
        views = [self.processor(list(view.permute(0, 2, 3, 1).numpy()), do_resize=False, do_center_crop=False,
                                return_tensors="pt")["pixel_values"][0] for view in drawn]
        return torch.stack([clean, *views])

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        encode = super().predict
        return predict_views(lambda pixels: encode(pixels, inputs), batch, "cls", self.config["views"])


class AstClsExpert(EncoderClsExpert):
    name = "ast-cls"
    description = ("per-layer [CLS] (position 0, not the distillation token) of a frozen transformers ASTModel after "
                   "its final LayerNorm over the clip's 16 kHz log-mel fbank, float16 [N, K, D] (eP-ALM's audio side)")
    default_model = "MIT/ast-finetuned-audioset-10-10-0.4593"
    model_class = ASTModel
    options = {"levels": 6, "views": 0, "freqm": 48, "timem": 192, "seed": 0}
    option_help = {"levels": FRAME_HELP["levels"],
                   "views": VIEWS_HELP + ": SpecAugment masks",
                   "freqm": "widest masked band of mel bins (AST's AudioSet setting)",
                   "timem": "widest masked span of frames (AST's AudioSet setting)",
                   "seed": "seed of the masks (with each clip's digest: a rerun writes the same bytes)"}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        check_views(self.name, self.config["views"])
        for option in ("freqm", "timem"):
            if self.config[option] < 0:
                raise ExpertError(f"{self.name}: {option} must be at least 0, got {self.config[option]}")

    def load(self) -> None:
        self.load_encoder()
        self.extractor = self.feature_extractor()

    def feature_extractor(self) -> ASTFeatureExtractor:
        """transformers' ASTFeatureExtractor with the AudioSet recipe at the checkpoint's size: the
        checkpoint's own (refused if it was trained on other statistics, as AST's Speech Commands
        models were), or, for a checkpoint saved without one, made from the recipe."""
        config = self.model.config
        recipe = {"sampling_rate": SAMPLE_RATE, "num_mel_bins": config.num_mel_bins, "max_length": config.max_length,
                  "do_normalize": True, "mean": decode_media.AUDIOSET_MEAN, "std": decode_media.AUDIOSET_STD}
        # At 16 kHz with 128 bins, filter 3 is so narrow that no FFT bin falls inside it: Kaldi's
        # filters (and so AST's training inputs) have the same empty row, and transformers warns.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            if not has_processor_config(self.model_source):
                return ASTFeatureExtractor(**recipe)
            try:
                extractor = ASTFeatureExtractor.from_pretrained(self.model_source)
            except (OSError, ValueError) as e:
                raise ExpertError(f"{self.name}: {self.model_ref}: unreadable {PROCESSOR_CONFIG}: {e}") from e
        differing = {k: getattr(extractor, k, None) for k, v in recipe.items()
                     if not np.isclose(float(getattr(extractor, k, np.nan)), float(v))}
        if differing:
            raise ExpertError(f"{self.name}: the feature extractor of {self.model_ref} differs from the AudioSet fbank "
                              f"recipe this expert computes ({recipe}) in {differing}")
        return extractor

    def spec(self, feature: str) -> FeatureSpec:
        config = self.model.config
        fbank = {"sample_rate": SAMPLE_RATE, "num_mel_bins": config.num_mel_bins, "frames": config.max_length,
                 "frame_length_ms": decode_media.FRAME_LENGTH_MS, "frame_shift_ms": decode_media.FRAME_SHIFT_MS,
                 "mean": decode_media.AUDIOSET_MEAN, "std": decode_media.AUDIOSET_STD}
        audio = {"mono": "mean of channels", "resample": "scipy resample_poly", "silence_peak": decode_media.SILENCE_PEAK}
        views = self.config["views"]
        if not views:
            return self.cls_spec(feature, {"audio": audio, "fbank": fbank, "token": 0}, config.hidden_size,
                                 num_mel_bins=config.num_mel_bins, max_length=config.max_length)
        masking = {"views": views, "freqm": self.config["freqm"], "timem": self.config["timem"],
                   "seed": self.config["seed"], "rule": "decode_media.mask_fbank, rng seeded by seed + clip digest"}
        spec = self.cls_spec(feature, {"audio": audio, "fbank": fbank, "token": 0, "spec_augment": masking},
                             config.hidden_size, num_mel_bins=config.num_mel_bins, max_length=config.max_length,
                             freqm=self.config["freqm"], timem=self.config["timem"])
        return views_spec(spec, views)

    def read_input(self, source: Source, sample: Sample) -> np.ndarray:
        load_audio = getattr(source, "load_audio", None)
        if load_audio is None:
            raise MediaError(f"{self.name} reads audio, but source '{source.name}' holds no audio (it has no load_audio)")
        return load_audio(sample, sample_rate=SAMPLE_RATE)

    def preprocess(self, waveform: np.ndarray) -> torch.Tensor:
        """float32 mono [samples] at 16 kHz -> float32 [max_length, num_mel_bins], or with views
        [1 + views, max_length, num_mel_bins]: the clean fbank, then the masked ones."""
        frame = int(SAMPLE_RATE * decode_media.FRAME_LENGTH_MS / 1000)
        if waveform.size < frame:  # the extractor would return padding alone, a spectrogram of nothing
            raise MediaError(f"too short: {waveform.size} samples, fewer than one {decode_media.FRAME_LENGTH_MS:g} ms frame "
                             f"({frame} samples at {SAMPLE_RATE} Hz)")
        features = self.extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
        if not self.config["views"]:
            return torch.from_numpy(features)
        rng = np.random.default_rng([self.config["seed"], content_digest(np.asarray(waveform, np.float32))])
        views = [decode_media.mask_fbank(features, rng, self.config["freqm"], self.config["timem"])
                 for _ in range(self.config["views"])]
        return torch.from_numpy(np.stack([features, *views]))

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        encode = super().predict
        return predict_views(lambda spectrograms: encode(spectrograms, inputs), batch, "cls", self.config["views"])


class VitAvgClsExpert(VitClsExpert):
    name = "vit-avg-cls"
    description = ("per-frame vit-cls of a frozen timm ViT averaged over num_frames sampled frames, float16 [N, K, D] "
                   "(the image-encoder baseline for eP-ALM's video tasks)")
    options = {"levels": 6, **FRAME_OPTIONS}
    option_help = FRAME_HELP

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        check_frame_options(self.name, self.config)

    def spec(self, feature: str) -> FeatureSpec:
        per_frame = super().spec(feature)
        return replace(
            per_frame,
            preprocess_hash=config_hash({"data_config": self.data_config, "pixels": PIXELS,
                                         "frames": frame_sampling(self.config),
                                         "pooling": "float32 mean over frames of the float16 per-frame [CLS]"}),
            params={**per_frame.params, "num_frames": self.config["num_frames"], "sampling": self.config["sampling"],
                    "frame_pooling": "mean"},
        )

    def read_input(self, source: Source, sample: Sample) -> np.ndarray:
        return read_frames(self.name, self.config, source, sample)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [T, 3, S, S], each frame through the ViT's own eval transform, as
        `vit-cls` prepares an image (on its uint8 tensor)."""
        as_image = super().preprocess
        return torch.stack([as_image(frame) for frame in torch.from_numpy(frames).permute(0, 3, 1, 2)])

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        per_frame = super().predict(batch.flatten(0, 1), inputs)["cls"]
        per_clip = per_frame.reshape(batch.shape[0], batch.shape[1], *per_frame.shape[1:])
        return {"cls": per_clip.astype(np.float32).mean(axis=1).astype(np.float16)}
