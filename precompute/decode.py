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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch


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
        opened: Path | io.BytesIO = io.BytesIO(path)
    else:
        opened = Path(path)
        check_file(opened)
    with pillow_errors(), Image.open(opened) as img:
        check_size(img, max_pixels)
        img.load()
        upright = ImageOps.exif_transpose(img)
    return to_rgb(upright)


def decode_image_tensor(path: Path | bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The same pixels as `decode_image`, as a uint8 [3, H, W] tensor, decoded faster where it can be.

    JPEG goes through `torchvision.io.decode_jpeg` (libjpeg-turbo, with the GIL released, so decode
    threads run in parallel); its pixels equal Pillow's, EXIF orientation and CMYK included (a
    test holds them equal). Pillow reads the header first (cheap), so the size limit holds before
    any pixel is decoded. Every other format, and any JPEG that torchvision refuses (truncated,
    corrupt, 12-bit, arithmetic-coded), goes through `decode_image`, whose reason a gap records.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.functional import pil_to_tensor

    if isinstance(path, bytes):
        data = path
    else:
        check_file(Path(path))
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise MediaError(f"cannot read file: {e}") from e
    if not data:
        raise MediaError("empty file (0 bytes)")
    with pillow_errors(), Image.open(io.BytesIO(data)) as img:
        check_size(img, max_pixels)
        is_jpeg = img.format == "JPEG"
    if is_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError:
            pass  # Pillow decides, and says why if it cannot either
    return pil_to_tensor(decode_image(data, max_pixels))


def check_size(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise MediaError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")


@contextmanager
def pillow_errors() -> Iterator[None]:
    """Pillow parsing bytes it does not trust fails with many exception types (OSError, SyntaxError,
    ValueError, EOFError, struct.error, zlib.error); every one means the same for us: a gap."""
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"image too large (decompression bomb): {e}") from e
    except Image.UnidentifiedImageError:
        raise MediaError("not an image: no decoder recognises the file") from None
    except Exception as e:
        raise MediaError(f"cannot decode: {type(e).__name__}: {e}") from e


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
