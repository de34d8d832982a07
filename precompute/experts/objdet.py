"""`objdet`: Prismer's object-detection label, an instance-index map painted far to near.

Prismer runs a detector (UniDet, threshold 0.5) and turns its boxes into one map: each box
becomes a filled rectangle, near-duplicates are dropped, and where rectangles overlap the one in
front wins. "In front" is decided, for each overlapping pair, by containment (a box that lies
entirely inside another is an object on top of it, e.g. a plate on a table) and otherwise by
the mean depth under each box, read from the depth label, which is why `objdet` requires
`depth`. The stored depth is *inverse* depth (DPT's output, min-max to 0..255): larger = nearer.

Here the detector is any transformers object detector (`AutoModelForObjectDetection` +
its image processor's `post_process_object_detection`): RT-DETR (`PekingU/rtdetr_r50vd`,
53 COCO AP at 640 px, real-time, NMS-free) by default, DETR (`facebook/detr-resnet-50`) or any
other checkpoint by path. RT-DETR is the default because it is the stronger and faster of the
two published COCO detectors and its processor already works at a fixed square size (640 x 640),
which is what a stacked batch needs; the image is squashed whole to that square, as the label
frame is, so boxes map straight onto the frame. Checkpoints whose processor has no fixed square
(DETR: shortest edge 800) run at 480 x 480, Prismer's size; `input_size` overrides.

Open vocabulary: an OWLv2 checkpoint (`google/owlv2-base-patch16-ensemble`; config model_type
"owlv2", `Owlv2ForObjectDetection` + `Owlv2Processor`) detects whatever the `classes` option
names (a comma list, e.g. "circle,square"), which is then required: class id i is the i-th name
and the class table embeds those names. Each name becomes the text query "a photo of a {name}",
the prompt of OWL-ViT's and transformers' examples, since the ensemble checkpoint was trained on
prompted captions rather than bare nouns. The queries are tokenised once at load and given to
every image of a batch. OWLv2's processor pads an image to a square before resizing; here
padding is off, so its own (anti-aliased) resize squashes the whole image to the square as for
the other detectors, and boxes map straight onto the frame. OWLv2's scores are sigmoid
similarities, typically lower than a closed-set detector's: consider a `threshold` near 0.1-0.3.

Prismer's pairwise rule does not give an order by itself; this expert makes it one, so the
instance index *is* the painting order and the trainer reads depth order off the ids:

1. boxes (frame pixels, rounded to the pixel grid) with no area are dropped;
2. by descending score, a box whose IoU with an already kept one exceeds 0.95 is a duplicate;
   at most 255 are kept (ids 0..254; 255 is background), the lowest scores go first;
3. order: a box containing another comes before it (behind); among boxes free of such
   constraints, the farthest (smallest mean inverse depth under the box) first;
4. paint in that order, so nearer instances overwrite farther ones.

Stored: "instances" uint8 [1, R, R] (index = position in that order, 255 background),
"classes" uint16 (detector class id of each instance, in index order) and "scores" float16,
both ragged with capacity 255. An image with no detections is an all-255 map with empty lists,
a valid label. `tables()` gives the embeddings of the detector's class names ("objdet").
"""

from __future__ import annotations

import heapq
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    Owlv2ForObjectDetection,
    Owlv2Processor,
)

from cache_schema import ArraySpec, ClassTable, FeatureSpec, config_hash, model_revision
from precompute.experts import ExpertError
from precompute.experts.base import pretrained_source
from precompute.experts.class_embed import DEFAULT_TEXT_ENCODER, TextEmbedder
from precompute.experts.labels import BACKGROUND_ID, LabelExpert, resize_maps
from precompute.experts.seg import GENERIC_LABEL, square_input_size

MAX_INSTANCES = BACKGROUND_ID  # ids 0..254 are instances, 255 is background: a uint8 map never wraps
DUPLICATE_IOU = 0.95
TABLE = "objdet"
OPEN_VOCABULARY_TYPE = "owlv2"
QUERY_TEMPLATE = "a photo of a {name}"


class ObjDetExpert(LabelExpert):
    name = "objdet"
    description = (
        "detector boxes as a depth-ordered instance map uint8 [N, 1, R, R] (255 background) + ragged class ids "
        "and scores (Prismer; needs depth)"
    )
    default_model = "PekingU/rtdetr_r50vd"
    options: ClassVar[dict[str, Any]] = {
        **LabelExpert.options,
        "threshold": 0.5,
        "input_size": 0,  # 0: the processor config's fixed square size if any, else 480
        "text_encoder": DEFAULT_TEXT_ENCODER,
        "classes": "",  # comma list of names to detect; required by (and only for) OWLv2 checkpoints
    }
    option_help: ClassVar[dict[str, str]] = {
        **LabelExpert.option_help,
        "threshold": "least detection score kept, 0 to 1",
        "input_size": "square side the detector sees; 0: the processor config's fixed size if any, else 480",
        "text_encoder": "text model that embeds the class names into the class table",
        "classes": "comma-separated names to detect: required by, and only for, OWLv2 checkpoints",
    }
    model_options: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if not 0.0 <= self.threshold <= 1.0:
            raise ExpertError(f"objdet: threshold must be in [0, 1], got {self.threshold}")
        self.classes = [name.strip() for name in str(self.config["classes"]).split(",") if name.strip()]
        if str(self.config["classes"]).strip() and not self.classes:
            raise ExpertError(f"objdet: classes {self.config['classes']!r} names no class")
        if len(set(self.classes)) != len(self.classes):
            raise ExpertError(f"objdet: classes {self.config['classes']!r} repeats a name")
        self.queries: dict[str, torch.Tensor] | None = None  # OWLv2's tokenised text queries, set by load()

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def requires(self) -> tuple[str, ...]:
        return ("depth",)

    def load(self) -> None:
        ref = pretrained_source(self.name, self.model_ref)
        try:
            config = AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise ExpertError(f"objdet: cannot load an object detector from {ref!r}: {e}") from e
        if config.model_type == OPEN_VOCABULARY_TYPE:
            self.names = self.load_open_vocabulary(ref, config)
        else:
            self.names = self.load_closed_set(ref, config)
        if not hasattr(self.processor, "post_process_object_detection"):
            raise ExpertError(f"objdet: {type(self.processor).__name__} of {ref} cannot post-process detections")
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.input_size = square_input_size(self.processor, int(self.config["input_size"]))
        if len(self.names) > np.iinfo(np.uint16).max + 1:
            raise ExpertError(f"objdet: {ref} has {len(self.names)} classes; class ids are stored as uint16")
        self.table = TextEmbedder(self.config["text_encoder"], self.device).table(self.names)

    def load_closed_set(self, ref: str, config: Any) -> list[str]:
        """A detector with its own classes (RT-DETR, DETR, ...): names from config.id2label."""
        if self.classes:
            raise ExpertError(
                f"objdet: the classes option is for open-vocabulary (OWLv2) detectors; {ref} is a "
                f"{config.model_type} with its own classes (config.id2label); drop classes or pass an OWLv2 checkpoint"
            )
        try:
            self.model = AutoModelForObjectDetection.from_pretrained(ref)
            self.model_id, self.revision = model_revision(ref)
        except (OSError, ValueError) as e:
            raise ExpertError(f"objdet: cannot load an object detector from {ref!r}: {e}") from e
        try:
            self.processor = AutoImageProcessor.from_pretrained(ref)
        except OSError as e:
            raise ExpertError(f"objdet: {ref} has no image processor config (preprocessor_config.json): {e}") from e
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        if all(GENERIC_LABEL.fullmatch(name) for name in names):
            raise ExpertError(f"objdet: {ref}'s config.id2label holds no class names (only LABEL_i); set id2label")
        return names

    def load_open_vocabulary(self, ref: str, config: Any) -> list[str]:
        """OWLv2: the `classes` names are the vocabulary, asked as one text query each."""
        if not self.classes:
            raise ExpertError(
                f"objdet: {ref} is an open-vocabulary OWLv2 detector; it needs the classes option "
                "(comma-separated names to detect, e.g. classes='person,car')"
            )
        try:
            self.model = Owlv2ForObjectDetection.from_pretrained(ref)
            self.model_id, self.revision = model_revision(ref)
            processor = Owlv2Processor.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise ExpertError(f"objdet: cannot load an OWLv2 detector and its processor from {ref!r}: {e}") from e
        self.processor = processor.image_processor
        texts = [QUERY_TEMPLATE.format(name=name) for name in self.classes]
        positions = config.text_config.max_position_embeddings
        lengths = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]
        if max(lengths) > positions:
            name = self.classes[int(np.argmax(lengths))]
            raise ExpertError(
                f"objdet: the query for class {name!r} is {max(lengths)} tokens, over OWLv2's {positions}"
            )
        queries = processor(text=texts, max_length=positions, return_tensors="pt")
        self.queries = {key: queries[key] for key in ("input_ids", "attention_mask")}
        return list(self.classes)

    def tables(self) -> dict[str, ClassTable]:
        return {TABLE: self.table}

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        hashed = {
            "processor": self.processor.to_dict(),
            "input_size": self.input_size,
            "resolution": r,
            "threshold": self.threshold,
            "postprocess": "post_process_object_detection; box masks; dedup iou>0.95; containment, then depth",
        }
        params = {
            "resolution": r,
            "input_size": self.input_size,
            "threshold": self.threshold,
            "duplicate_iou": DUPLICATE_IOU,
            "num_classes": len(self.names),
            "table": TABLE,
            "table_digest": self.table.digest,
            "depth_feature": "depth",
        }
        if self.queries is not None:  # only open-vocabulary specs carry these, so closed-set specs stay as they were
            hashed |= {"classes": self.names, "query_template": QUERY_TEMPLATE, "do_pad": False}
            params["classes"] = ",".join(self.names)
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash(hashed),
            arrays=(
                ArraySpec("instances", "uint8", (1, r, r)),
                ArraySpec("classes", "uint16", (MAX_INSTANCES,), ragged=True),
                ArraySpec("scores", "float16", (MAX_INSTANCES,), ragged=True),
            ),
            params=params,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The whole image squashed to the square input, as the checkpoint's processor prepares it (OWLv2 unpadded)."""
        size = {"height": self.input_size, "width": self.input_size}
        unpadded = {"do_pad": False} if self.queries is not None else {}
        pixels = self.processor(images=image.convert("RGB"), size=size, return_tensors="pt", **unpadded)
        return pixels["pixel_values"][0]

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        if "depth" not in inputs or "depth" not in inputs["depth"]:
            raise ExpertError("objdet: needs the cached depth label of these samples (inputs['depth']['depth'])")
        r = self.resolution
        depth = resize_maps(torch.from_numpy(np.asarray(inputs["depth"]["depth"])).float(), r)[:, 0].numpy()
        pixel_values = batch.to(self.device, self.dtype)
        if self.queries is None:
            outputs = self.model(pixel_values=pixel_values)
        else:  # OWLv2 takes [batch * queries, tokens]: the same queries for every image
            text = {key: value.repeat(len(batch), 1).to(self.device) for key, value in self.queries.items()}
            outputs = self.model(pixel_values=pixel_values, **text)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        detections = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(r, r)] * len(batch)
        )
        maps, classes, scores = [], [], []
        for detection, inverse_depth in zip(detections, depth):
            instance_map, instance_classes, instance_scores = box_instance_map(
                detection["boxes"].cpu().numpy(), detection["scores"].cpu().numpy(),
                detection["labels"].cpu().numpy(), inverse_depth,
            )
            maps.append(instance_map[None])
            classes.append(instance_classes)
            scores.append(instance_scores)
        return {"instances": np.stack(maps), "classes": classes, "scores": scores}


def box_instance_map(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    inverse_depth: np.ndarray,
    duplicate_iou: float = DUPLICATE_IOU,
    max_instances: int = MAX_INSTANCES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prismer's instance map from boxes (x0, y0, x1, y1 in pixels of `inverse_depth`'s frame).

    Returns (uint8 [H, W] map, uint16 [k] classes, float16 [k] scores); see the module docstring
    for the rules. Boxes are compared as the pixel sets they paint, so IoU and containment are
    exact on the map.
    """
    height, width = inverse_depth.shape
    pixels = np.floor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + 0.5).astype(np.int64)
    pixels[:, 0::2] = pixels[:, 0::2].clip(0, width)
    pixels[:, 1::2] = pixels[:, 1::2].clip(0, height)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    areas = (pixels[:, 2] - pixels[:, 0]) * (pixels[:, 3] - pixels[:, 1])
    candidates = np.flatnonzero((pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1]))
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]

    overlaps = pairwise_intersections(pixels[candidates])
    unions = areas[candidates][:, None] + areas[candidates][None, :] - overlaps
    iou = overlaps / unions
    kept: list[int] = []
    for i in range(len(candidates)):
        if len(kept) == max_instances:
            break
        if not kept or iou[i, kept].max() <= duplicate_iou:
            kept.append(i)
    kept_boxes = candidates[kept]

    order = paint_order(pixels[kept_boxes], scores[kept_boxes], inverse_depth)
    ordered = kept_boxes[order]
    instance_map = np.full((height, width), BACKGROUND_ID, dtype=np.uint8)
    for index, (x0, y0, x1, y1) in enumerate(pixels[ordered]):
        instance_map[y0:y1, x0:x1] = index
    return (
        instance_map,
        np.asarray(classes).reshape(-1)[ordered].astype(np.uint16),
        scores[ordered].astype(np.float16),
    )


def pairwise_intersections(boxes: np.ndarray) -> np.ndarray:
    """Pixel counts of the pairwise intersections of integer boxes [n, 4] -> [n, n]."""
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    return (x1 - x0).clip(min=0) * (y1 - y0).clip(min=0)


def paint_order(boxes: np.ndarray, scores: np.ndarray, inverse_depth: np.ndarray) -> np.ndarray:
    """Positions of `boxes` from back to front: containers before what they contain, else farthest first.

    A topological order of "contains" (acyclic: two boxes containing each other would be
    identical, and duplicates are gone) that always takes the farthest box among those whose
    containers are all painted; ties go to the lower score, then the earlier box.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    summed = np.zeros((inverse_depth.shape[0] + 1, inverse_depth.shape[1] + 1), dtype=np.float64)
    summed[1:, 1:] = inverse_depth.astype(np.float64).cumsum(0).cumsum(1)
    x0, y0, x1, y1 = boxes.T
    depth_sums = summed[y1, x1] - summed[y0, x1] - summed[y1, x0] + summed[y0, x0]
    mean_depth = depth_sums / ((x1 - x0) * (y1 - y0))

    contains = (
        (x0[:, None] <= x0[None, :]) & (y0[:, None] <= y0[None, :])
        & (x1[:, None] >= x1[None, :]) & (y1[:, None] >= y1[None, :])
    )
    np.fill_diagonal(contains, False)
    containers_left = contains.sum(axis=0)
    ready = [(mean_depth[j], scores[j], j) for j in range(n) if containers_left[j] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, i = heapq.heappop(ready)
        order.append(i)
        for j in np.flatnonzero(contains[i]):
            containers_left[j] -= 1
            if containers_left[j] == 0:
                heapq.heappush(ready, (mean_depth[j], scores[j], j))
    return np.asarray(order, dtype=np.int64)
