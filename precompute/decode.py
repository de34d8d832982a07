"""Decode any image file a dataset may contain into the one form experts accept: 8-bit RGB.

Real datasets hold grayscale, palette, CMYK, 16-bit and transparent images, phone photos whose
pixels are stored sideways with an EXIF orientation tag, and a few broken files. Each of these is
either converted faithfully or refused with a `MediaError` whose message is the reason recorded in
the cache. Two choices are deliberate:

- Truncated files are refused. Pillow can be told to pad them with grey
  (`ImageFile.LOAD_TRUNCATED_IMAGES`); we never do, because a half-grey image gives a plausible but
  wrong feature that nobody will ever notice. `img.load()` forces the full decode here, so the
  error surfaces now and not inside an expert.
- Transparent pixels are composited onto white. Their colour values are arbitrary (often black,
  sometimes leftovers of an editor), so dropping alpha shows garbage; white is what the image looks
  like on a page, which is how its captions were written.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps



class MediaError(Exception):
    """One sample's media cannot be decoded; str(e) is the reason recorded in the cache (a gap).

    It lives with the decoders that raise it; sources and experts raise it too, for media they
    cannot even reach (a missing file, a malformed locator).
    """

# Pillow's own default warning threshold (about 89 megapixels, a 9459 x 9459 image, ~270 MB as
# RGB). Anything larger is refused before its pixels are decoded: it is a decompression bomb or
# at least far beyond what any expert resizes from.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def decode_image(path: Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decode `path` (or an archive member's bytes) into an 8-bit RGB image, upright per its
    EXIF orientation."""
    if isinstance(path, bytes):
        if not path:
            raise MediaError("empty file (0 bytes)")
        opened = io.BytesIO(path)
    else:
        opened = Path(path)
        check_file(opened)

    # Everything in this block is Pillow parsing bytes it does not trust; its failures come as
    # many exception types (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error),
    # and every one of them means the same thing for us: this sample is a gap.
    try:
        with Image.open(opened) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(
                    f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            img.load()
            upright = ImageOps.exif_transpose(img)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"image too large (decompression bomb): {e}") from e
    except Image.UnidentifiedImageError:
        raise MediaError("not an image: no decoder recognises the file") from None
    except Exception as e:
        raise MediaError(f"cannot decode: {type(e).__name__}: {e}") from e
    return to_rgb(upright)


def check_file(path: Path) -> None:
    """A missing, unreadable or empty media file is a gap with its reason, whatever decodes it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MediaError(f"file not found: {path}") from None
    except OSError as e:
        raise MediaError(f"cannot read file: {e}") from e
    if size == 0:
        raise MediaError("empty file (0 bytes)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or exposing transparent pixels."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        return Image.fromarray(sixteen_bit_to_eight(np.asarray(img), img.mode)).convert("RGB")
    if img.mode == "F":
        raise MediaError("unsupported: floating-point pixels have no standard 8-bit scale")
    if img.mode == "P" and img.has_transparency_data:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK itself), YCbCr, LAB, HSV.
    return img.convert("RGB")


def sixteen_bit_to_eight(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map 0..65535 onto 0..255 linearly (v / 257, rounded); Pillow's own conversion clips at 255.

    Mode "I" is 32-bit integer storage; Pillow uses it for 16-bit grayscale from some formats, so
    values inside 0..65535 are read as 16-bit. Anything outside has no agreed meaning as a photo.
    """
    if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise MediaError(
            "unsupported: 32-bit integer pixels outside 0..65535 "
            f"(min {int(pixels.min())}, max {int(pixels.max())})"
        )
    return np.rint(pixels.astype(np.float64) / 257.0).astype(np.uint8)
