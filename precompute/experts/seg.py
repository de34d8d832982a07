"""`seg-coco`, `seg-ade`: Prismer's segmentation labels, a semantic class id per pixel from Mask2Former.

Prismer runs Mask2Former Swin-L (ImageNet-21k, 384) trained for COCO panoptic (133 classes) and
for ADE20K panoptic (150 classes), and keeps its *semantic* output: per pixel, the class whose
score summed over all queries is highest. Here the same checkpoints come from transformers
(`Mask2FormerForUniversalSegmentation`) and the same rule is applied, batched:

    score[c, y, x] = sum_q softmax(class_logits[q])[c] * sigmoid(mask_logits[q, y, x])

with the "no object" class dropped from the softmax's output (not renormalised), exactly what
`Mask2FormerImageProcessor.post_process_semantic_segmentation` computes. The mask logits (at a
quarter of the input size) are resized bilinearly to the label frame first, so the argmax is
taken at the resolution that is stored and every pixel gets its own decision.

Input size: Prismer resized images to a long side of 480 before Mask2Former. Batches here are
stacked tensors, so the input is a square: the whole image resized to `input_size` x
`input_size` (480 by default, a multiple of Swin's 32-pixel stride), the same squash that makes
the label frame, so labels align with the frame. A model whose image-processor config fixes a
square size (the shapes world's stand-in: 64 x 64) runs at that size instead; `input_size`
overrides both. Normalisation comes from the checkpoint's own `preprocessor_config.json`, or
Mask2Former's defaults (ImageNet mean/std) when the directory has none.

The stored label is uint8 [1, R, R] (so at most 256 classes); `tables()` gives the
class-name embeddings (Prismer's 64-d CLIP + PCA vectors) the trainer turns ids into.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

from cache_schema import ArraySpec, ClassTable, FeatureSpec, config_hash, model_revision
from precompute.experts import ExpertError
from precompute.experts.base import pretrained_source
from precompute.experts.class_embed import DEFAULT_TEXT_ENCODER, TextEmbedder
from precompute.experts.labels import LabelExpert
from precompute.experts.vocab import ADE20K_CLASSES, COCO_PANOPTIC_CLASSES

PRISMER_INPUT_SIZE = 480  # Prismer's segmentation and detection experts saw images at 480 px
MIN_INPUT_SIZE = 64  # the pixel decoder group-normalises stride-32 features: they need 2 x 2 positions
GENERIC_LABEL = re.compile(r"LABEL_\d+")
# A checkpoint whose config only says LABEL_i is named by the vocabulary its class count implies.
VOCABULARY_BY_SIZE = {len(COCO_PANOPTIC_CLASSES): COCO_PANOPTIC_CLASSES, len(ADE20K_CLASSES): ADE20K_CLASSES}


def square_input_size(processor: Any, requested: int) -> int:
    """The square input side: `requested`, else the processor's fixed square size, else Prismer's 480."""
    if requested > 0:
        return requested
    size = getattr(processor, "size", None) or {}  # a SizeDict (torchvision backend) or a dict (PIL backend)
    height, width = size.get("height"), size.get("width")
    if height and height == width:
        return int(height)
    return PRISMER_INPUT_SIZE


def class_names(config: Any, model_ref: str) -> list[str]:
    """Class id -> name from the checkpoint's config, or the standard vocabulary its size implies."""
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if all(GENERIC_LABEL.fullmatch(name) for name in names):
        if config.num_labels not in VOCABULARY_BY_SIZE:
            raise ExpertError(
                f"{model_ref}: config.id2label holds no class names (only LABEL_i) and {config.num_labels} classes "
                f"match neither COCO panoptic ({len(COCO_PANOPTIC_CLASSES)}) nor ADE20K ({len(ADE20K_CLASSES)}); "
                "set id2label in its config.json"
            )
        names = list(VOCABULARY_BY_SIZE[config.num_labels])
    return names


class Mask2FormerSegExpert(LabelExpert):
    """Semantic segmentation labels from a Mask2Former checkpoint (COCO or ADE by default model)."""

    options: ClassVar[dict[str, Any]] = {
        **LabelExpert.options,
        "input_size": 0,  # 0: the processor config's fixed square size if any, else 480
        "text_encoder": DEFAULT_TEXT_ENCODER,
    }
    option_help: ClassVar[dict[str, str]] = {
        **LabelExpert.option_help,
        "input_size": "square side Mask2Former sees; 0: the processor config's fixed size if any, else 480",
        "text_encoder": "text model that embeds the class names into the class table",
    }
    model_options: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def load(self) -> None:
        ref = pretrained_source(self.name, self.model_ref)
        try:
            config = AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise ExpertError(f"{self.name}: cannot load a model config from {ref!r}: {e}") from e
        if config.model_type != "mask2former":
            raise ExpertError(f"{self.name}: {ref} is a {config.model_type!r} model, not Mask2Former")
        if config.num_labels > 256:
            raise ExpertError(f"{self.name}: {ref} has {config.num_labels} classes; the uint8 label holds at most 256")
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(ref)
            self.model_id, self.revision = model_revision(ref)
        except (OSError, ValueError) as e:
            raise ExpertError(f"{self.name}: cannot load Mask2Former weights from {ref!r}: {e}") from e
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        try:
            self.processor = AutoImageProcessor.from_pretrained(ref)
        except OSError:  # a checkpoint without preprocessor_config.json: Mask2Former's own defaults
            self.processor = Mask2FormerImageProcessor()
        self.input_size = square_input_size(self.processor, int(self.config["input_size"]))
        if self.input_size < MIN_INPUT_SIZE:
            raise ExpertError(f"{self.name}: input_size {self.input_size} is too small; Mask2Former needs at least "
                              f"{MIN_INPUT_SIZE} px (2 x 2 features at its deepest stride, 32)")
        self.names = class_names(self.model.config, ref)
        self.table = TextEmbedder(self.config["text_encoder"], self.device).table(self.names)

    def tables(self) -> dict[str, ClassTable]:
        return {self.name: self.table}

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash({
                "processor": self.processor.to_dict(),
                "input_size": self.input_size,
                "resolution": r,
                "postprocess": "argmax_c sum_q softmax(class)[:-1] * sigmoid(bilinear(mask, R))",
            }),
            arrays=(ArraySpec("seg", "uint8", (1, r, r)),),
            params={
                "resolution": r,
                "input_size": self.input_size,
                "num_classes": len(self.names),
                "table": self.name,
                "table_digest": self.table.digest,
            },
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The whole image squashed to the square input, normalised as the checkpoint expects."""
        size = {"height": self.input_size, "width": self.input_size}
        return self.processor(images=image.convert("RGB"), size=size, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        outputs = self.model(pixel_values=batch.to(self.device, self.dtype))
        return {"seg": semantic_map(outputs.class_queries_logits, outputs.masks_queries_logits, self.resolution)}


def semantic_map(class_logits: torch.Tensor, mask_logits: torch.Tensor, resolution: int) -> np.ndarray:
    """uint8 [B, 1, R, R] class ids from Mask2Former's query outputs (see the module docstring).

    One sample at a time: the per-class score volume is [C, R, R] floats (30 MB for ADE at 224),
    which a whole batch of would not fit comfortably.
    """
    class_probs = class_logits.float().softmax(dim=-1)[..., :-1]
    maps = []
    for probs, masks in zip(class_probs, mask_logits):
        masks = F.interpolate(masks[None].float(), size=(resolution, resolution), mode="bilinear",
                              align_corners=False)[0]
        scores = torch.einsum("qc,qhw->chw", probs, masks.sigmoid())
        maps.append(scores.argmax(dim=0))
    return torch.stack(maps)[:, None].to(torch.uint8).cpu().numpy()


class SegCocoExpert(Mask2FormerSegExpert):
    name = "seg-coco"
    description = "Mask2Former (COCO panoptic, 133 classes) semantic class id per pixel, uint8 [N, 1, R, R] (Prismer)"
    default_model = "facebook/mask2former-swin-large-coco-panoptic"


class SegAdeExpert(Mask2FormerSegExpert):
    name = "seg-ade"
    description = "Mask2Former (ADE20K panoptic, 150 classes) semantic class id per pixel, uint8 [N, 1, R, R] (Prismer)"
    default_model = "facebook/mask2former-swin-large-ade-panoptic"
