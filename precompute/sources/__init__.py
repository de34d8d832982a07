"""The datasets precompute can read, by the name `--shards` takes."""

from __future__ import annotations

from pathlib import Path

from precompute.decode import MediaError  # what a source's load_image raises, decoding's own error
from precompute.sources.audiocaps import AudiocapsSource
from precompute.sources.base import Sample, Source, SourceError
from precompute.sources.coco import CocoSource
from precompute.sources.food101 import Food101Source
from precompute.sources.images import ImagesSource
from precompute.sources.mmimdb import MmImdbSource
from precompute.sources.msrvtt import MsrvttSource
from precompute.sources.msvd import MsvdSource
from precompute.sources.shapes import ShapesSource
from precompute.sources.shapes_video import ShapesVideoSource
from precompute.sources.snli_ve import SnliVeSource
from precompute.sources.tabletop import TabletopInstructSource, TabletopSource
from precompute.sources.videos import AudioFolderSource, VideoFolderSource
from precompute.sources.vqav2 import Vqav2Source
from precompute.sources.wds import WdsSource

SOURCES: dict[str, type[Source]] = {
    cls.name: cls
    for cls in (
        ShapesSource, ImagesSource, CocoSource, Vqav2Source, Food101Source, MmImdbSource, SnliVeSource,
        VideoFolderSource, AudioFolderSource, MsrvttSource, MsvdSource, AudiocapsSource, ShapesVideoSource, WdsSource,
        TabletopSource, TabletopInstructSource,
    )
}


def resolve_split(name: str, split: str | None) -> str:
    """The split a run over source `name` reads: `split` when given; else `train` where the source
    has one, else its only split (`images`, `videos`, `audio` have just `all`). A source with
    several splits and no `train` makes the user choose, with the splits listed.

    Why not always `train`: `--shards images` with no `--split` must just work, and a default
    that silently picked some other split of a many-split source would be a guess.
    """
    if name not in SOURCES:
        raise SourceError(f"unknown source '{name}'; known sources: {', '.join(SOURCES)}")
    if split is not None:
        return split
    splits = SOURCES[name].splits
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise SourceError(f"source '{name}' has no split 'train'; choose one with --split: {', '.join(splits)}")


def split_names(name: str, splits: str | None) -> list[str | None]:
    """`--split` as a list: None (the source's choice), one split, or comma-separated splits, each
    one the source has (checked here, before any of them runs)."""
    if splits is None:
        return [None]
    names = [split.strip() for split in splits.split(",") if split.strip()]
    if not names:
        raise SourceError(f"--split {splits!r} names no split")
    if name in SOURCES:
        unknown = [split for split in names if split not in SOURCES[name].splits]
        if unknown:
            raise SourceError(f"source '{name}' has no split '{unknown[0]}'; splits: {', '.join(SOURCES[name].splits)}")
    return list(dict.fromkeys(names))


def get_source(name: str, data_root: Path | str | None, split: str | None, **options) -> Source:
    """The named source over `data_root`; `split=None` picks as `resolve_split` says."""
    split = resolve_split(name, split)  # also refuses an unknown source
    return SOURCES[name](data_root, split, **options)


__all__ = ["SOURCES", "MediaError", "Sample", "Source", "SourceError", "get_source", "resolve_split"]
