"""`mmimdb`: MM-IMDb, movie posters with their plots, tagged with genres (multi-label).

    DATA_ROOT/                                 the unpacked mmimdb.tar.gz (Arevalo et al., 2017)
      split.json                               {"train": [ids], "dev": [ids], "test": [ids]}
      dataset/0000008.jpeg                     the poster
      dataset/0000008.json                     IMDb metadata, among it "plot": [str, ...] and
                                               "genres": [str, ...]

Splits are the dataset's own; `val` is its `dev`. The classes are the 23 genres of the MMBT /
MoPE setup, in the order of the dataset paper's table (by frequency). As in MMBT's and MoPE's
preprocessing, a movie tagged with any other genre (News, Reality-TV, Talk-Show; Adult, which
occurs only in test) is left out of every split rather than stripped of that tag, and so is a
movie without a plot. Annotations: {"text": the longest of its plots (the first of equal
length), "label": sorted indices of its genres}. Key: the IMDb id from split.json ("0000008").
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from precompute.sources.base import Sample, Source, SourceError, read_json, sorted_by_key

GENRES = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)  # fmt: skip

SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # ours -> split.json's


class MmImdbSource(Source):
    name: ClassVar[str] = "mmimdb"
    description: ClassVar[str] = (
        "MM-IMDb: DATA_ROOT/split.json + DATA_ROOT/dataset/ID.{jpeg,json}; posters + longest "
        "plot, 23 genres, multi-label; val = the dataset's dev"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = tuple(SPLIT_NAMES)

    def __init__(self, data_root: Path | str | None, split: str, **options):
        super().__init__(data_root, split, **options)
        self.split_file = self.data_root / "split.json"
        self.dataset_dir = self.data_root / "dataset"
        if not self.split_file.is_file():
            raise SourceError(f"mmimdb: split file {self.split_file} not found")
        if not self.dataset_dir.is_dir():
            raise SourceError(f"mmimdb: movie folder {self.dataset_dir} not found")

    def samples(self) -> list[Sample]:
        splits = read_json(self.split_file)
        published = SPLIT_NAMES[self.split]
        if not isinstance(splits, dict) or not isinstance(splits.get(published), list):
            raise SourceError(f"annotation file {self.split_file} has no '{published}' list")
        index_of = {genre: i for i, genre in enumerate(GENRES)}
        samples = []
        for movie_id in splits[published]:
            if not isinstance(movie_id, str) or not movie_id:
                raise SourceError(
                    f"annotation file {self.split_file}: '{published}' holds {movie_id!r}, "
                    "not an IMDb id string"
                )
            path = self.dataset_dir / f"{movie_id}.json"
            movie = read_json(path)
            plots, genres = string_list(movie, "plot", path), string_list(movie, "genres", path)
            text = max(plots, key=len, default="").strip()
            if not text or any(genre not in index_of for genre in genres):
                continue
            samples.append(
                Sample(
                    key=movie_id,
                    media=str(self.dataset_dir / f"{movie_id}.jpeg"),
                    annotations={"text": text, "label": sorted({index_of[g] for g in genres})},
                )
            )
        return sorted_by_key(samples, self.split_file)

    def image_file(self, sample: Sample) -> Path:
        return Path(sample.media)

    def info(self) -> dict:
        return {
            **super().info(),
            "split_file": str(self.split_file),
            "dataset_dir": str(self.dataset_dir),
            "classes": list(GENRES),
            "multi_label": True,
        }


def string_list(movie: object, field: str, path: Path) -> list[str]:
    """`movie[field]`, a list of strings in the published files; anything else names the file."""
    value = movie.get(field) if isinstance(movie, dict) else None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SourceError(f"annotation file {path} has no '{field}' list of strings")
    return value
