"""`precompute preview`: one sample's image and every label of it, colour-mapped, as a PNG grid.

Label maps are numbers nobody can check by reading them; a picture shows at a glance whether
depth is nearer where it should be, whether segments follow objects and which words OCR found.
Each tile is titled with the feature name, and id maps list the class names (from the cache's
class tables) or words they contain.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cache_schema import CacheError, SplitReader, list_splits, read_table

TILE = 256
TITLE_HEIGHT = 16
LEGEND_LINES = 4
BACKGROUND_ID = 255


def palette(count: int = 256) -> np.ndarray:
    """Distinct colours for ids (golden-ratio hues); id 255 (background) is black."""
    colours = np.array(
        [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2)) for i in range(count)]
    )
    colours = (colours * 255).astype(np.uint8)
    colours[BACKGROUND_ID] = 0
    return colours


def heat(values: np.ndarray) -> np.ndarray:
    """0..255 -> a dark-blue to yellow ramp (perceptually ordered, readable in greyscale)."""
    t = values.astype(np.float32) / 255.0
    red = np.clip(1.5 * t - 0.2, 0, 1)
    green = np.clip(1.2 * t**1.3, 0, 1)
    blue = np.clip(0.55 + 0.6 * np.sin(np.pi * (t + 0.15)) - 0.7 * t, 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def label_tiles(feature: str, sample: dict[str, Any], names: list[str] | None) -> list[tuple[str, np.ndarray, list[str]]]:
    """(title, RGB image, legend lines) for each map a feature holds; features that are not maps
    (embeddings such as vit-cls) give none."""
    def name_of(i: int) -> str:
        return names[i] if names and i < len(names) else str(i)

    if "rgb" in sample:
        return [(feature, sample["rgb"].transpose(1, 2, 0), [])]
    if "normal" in sample:
        return [(feature, sample["normal"].transpose(1, 2, 0), [])]
    if "depth" in sample:
        return [(feature, heat(sample["depth"][0]), ["bright = near"])]
    if "edge" in sample:
        return [(feature, np.repeat(sample["edge"][0][..., None], 3, -1), ["dark = edge"])]
    if "seg" in sample:
        ids = sample["seg"][0]
        return [(feature, palette()[ids], [f"{i}: {name_of(i)}" for i in np.unique(ids).tolist()])]
    if "instances" in sample:
        scores = sample.get("scores", np.zeros(len(sample["classes"])))
        legend = [f"{i}: {name_of(c)} {s:.2f}" for i, (c, s) in enumerate(zip(sample["classes"].tolist(), scores.tolist()))]
        return [(feature, palette()[sample["instances"][0]], legend or ["no instances"])]
    if "words" in sample:
        words = [w for w in sample.get("text", "").split("\n") if w]
        return [(feature, palette()[sample["words"][0]], [f"{i}: {w}" for i, w in enumerate(words)] or ["no text"])]
    return []


def preview(cache: str | Path, key: str, out: str | Path, split: str | None = None) -> Path:
    """Write the grid for sample `key` to `out`; `split` is SOURCE/SPLIT when the key is ambiguous."""
    splits = list_splits(cache) if split is None else [tuple(split.split("/", 1))]
    readers = [SplitReader(cache, source, name) for source, name in splits]
    holding = [r for r in readers if key in set(r.keys)]
    if not holding:
        raise CacheError(f"{cache}: no sample {key!r} in {', '.join(f'{s}/{p}' for s, p in splits) or 'any split'}")
    reader = holding[0]
    index = reader.index_of(key)
    tiles: list[tuple[str, np.ndarray, list[str]]] = []
    for feature_name in sorted(reader.feature_names, key=lambda name: name != "rgb"):  # the picture first
        feature = reader.feature(feature_name)
        if not feature.usable[index]:
            tiles.append((f"{feature_name}: not available", np.zeros((8, 8, 3), np.uint8), ["gap or uncommitted shard"]))
            continue
        table = feature.spec.params.get("table")
        names = read_table(cache, table).names if table else None
        tiles.extend(label_tiles(feature_name, feature.get(index), names))
    if not tiles:
        raise CacheError(f"{cache}: {reader.source}/{reader.split} has no image-like features to preview")
    font = ImageFont.load_default(size=11)
    columns = min(4, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_height = TILE + TITLE_HEIGHT + LEGEND_LINES * 12
    grid = Image.new("RGB", (columns * TILE, rows * cell_height + TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), f"{reader.source}/{reader.split} {key}", fill=(0, 0, 0), font=font)
    for i, (title, image, legend) in enumerate(tiles):
        x, y = (i % columns) * TILE, TITLE_HEIGHT + (i // columns) * cell_height
        draw.text((x + 4, y + 2), title, fill=(0, 0, 0), font=font)
        grid.paste(Image.fromarray(np.ascontiguousarray(image)).resize((TILE - 8, TILE - 8), Image.Resampling.NEAREST), (x + 4, y + TITLE_HEIGHT))
        shown = legend if len(legend) <= LEGEND_LINES else legend[: LEGEND_LINES - 1] + [f"... {len(legend) - LEGEND_LINES + 1} more"]
        for line, text in enumerate(shown):
            draw.text((x + 4, y + TITLE_HEIGHT + TILE - 6 + 12 * line), text, fill=(60, 60, 60), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
