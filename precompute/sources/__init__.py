"""The datasets precompute can read, by the name `--shards` takes."""

from __future__ import annotations

from pathlib import Path

from precompute.sources.base import MediaError, Sample, Source, SourceError
from precompute.sources.audiocaps import AudiocapsSource
from precompute.sources.coco import CocoSource
from precompute.sources.food101 import Food101Source
from precompute.sources.images import ImagesSource
from precompute.sources.mmimdb import MmImdbSource
from precompute.sources.msrvtt import MsrvttSource
from precompute.sources.msvd import MsvdSource
from precompute.sources.shapes import ShapesSource
from precompute.sources.shapes_video import ShapesVideoSource
from precompute.sources.snli_ve import SnliVeSource
from precompute.sources.videos import AudioFolderSource, VideoFolderSource
from precompute.sources.vqav2 import Vqav2Source
from precompute.sources.wds import WdsSource

SOURCES: dict[str, type[Source]] = {
    cls.name: cls
    for cls in (
        ShapesSource, ImagesSource, CocoSource, Vqav2Source, Food101Source, MmImdbSource, SnliVeSource,
        VideoFolderSource, AudioFolderSource, MsrvttSource, MsvdSource, AudiocapsSource, ShapesVideoSource, WdsSource,
    )
}


def get_source(name: str, data_root: Path | str | None, split: str | None, **options) -> Source:
    """The named source over `data_root`; `split=None` means the source's first split."""
    if name not in SOURCES:
        raise SourceError(f"unknown source '{name}'; known sources: {', '.join(SOURCES)}")
    cls = SOURCES[name]
    return cls(data_root, cls.splits[0] if split is None else split, **options)


__all__ = ["SOURCES", "MediaError", "Sample", "Source", "SourceError", "get_source"]
