"""`food101`: UPMC Food-101, food photos with the title of the web page each was found on.

    DATA_ROOT/
      images/train/apple_pie/apple_pie_0.jpg       one folder per class, train and test
      images/test/apple_pie/apple_pie_175.jpg
      texts/train_titles.csv                       rows "file,text,class", no header
      texts/test_titles.csv                        e.g. apple_pie_175.jpg,My Apple Pie Recipe,apple_pie

The published dataset has train and test only. `val` is carved out of train here: the files whose
SHA-256 of the file name falls in 1/20 of the hash space (about 5%), so the carve is the same on
every machine and does not move when rows are added or reordered; `train` is the rest. (MoPE's
preprocessing instead holds out 5,000 stratified random train samples, unseeded: not reproducible.)

Classes are the class names found in train_titles.csv, sorted: for the full dataset these are the
101 Food-101 names in the order MMBT and MoPE index them. Annotations: {"text": the page title,
HTML entities decoded (the titles were scraped with `&amp;` and `&#039;` left in), "label": class
index}. Key: the file name without extension ("apple_pie_175"), unique because it carries the
class. MoPE's own preprocessing reads the full page text (`texts_txt/`), which the widely shared
copy of the dataset does not include; the title is the text this layout has.
"""

from __future__ import annotations

import csv
import hashlib
import html
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import Sample, Source, SourceError, sorted_by_key

VAL_SHARE = 20  # one file name in VAL_SHARE (by hash) goes to `val`


class Food101Source(Source):
    name: ClassVar[str] = "food101"
    description: ClassVar[str] = (
        "UPMC Food-101: DATA_ROOT/texts/{train,test}_titles.csv + DATA_ROOT/images/{train,test}/"
        "CLASS/; 101 classes; val = a fixed 5% of train by file-name hash"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self, data_root: Path | str | None, split: str, **options):
        super().__init__(data_root, split, **options)
        published_split = "test" if split == "test" else "train"
        self.titles_file = self.data_root / "texts" / f"{published_split}_titles.csv"
        self.train_titles_file = self.data_root / "texts" / "train_titles.csv"
        self.image_dir = self.data_root / "images" / published_split
        for path in (self.titles_file, self.train_titles_file):
            if not path.is_file():
                raise SourceError(f"food101: annotation file {path} not found")
        if not self.image_dir.is_dir():
            raise SourceError(f"food101: image folder {self.image_dir} not found")

    @cached_property
    def classes(self) -> list[str]:
        return sorted({class_name for _, _, class_name in read_titles(self.train_titles_file)})

    def samples(self) -> list[Sample]:
        index_of = {name: i for i, name in enumerate(self.classes)}
        samples = []
        for file_name, text, class_name in read_titles(self.titles_file):
            if class_name not in index_of:
                raise SourceError(
                    f"annotation file {self.titles_file}: class '{class_name}' of {file_name} "
                    f"is not a class of {self.train_titles_file}"
                )
            if self.split != "test" and in_val(file_name) != (self.split == "val"):
                continue
            samples.append(
                Sample(
                    key=Path(file_name).stem,
                    media=str(self.image_dir / class_name / file_name),
                    annotations={"text": text, "label": index_of[class_name]},
                )
            )
        return sorted_by_key(samples, self.titles_file)

    def image_file(self, sample: Sample) -> Path:
        return Path(sample.media)

    def info(self) -> dict:
        return {
            **super().info(),
            "annotation_file": str(self.titles_file),
            "image_dir": str(self.image_dir),
            "classes": self.classes,
            "multi_label": False,
        }


def read_titles(path: Path) -> list[tuple[str, str, str]]:
    """(file name, title, class name) per row of a *_titles.csv."""
    rows = []
    # Scraped titles hold the odd byte that is not UTF-8; a replacement character costs nothing,
    # refusing the whole file would cost the dataset.
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if len(row) != 3 or not row[0].strip() or not row[2].strip():
                    raise SourceError(
                        f"annotation file {path} line {reader.line_num}: expected "
                        f"'file,text,class', got {len(row)} field(s): {row!r:.200}"
                    )
                rows.append((row[0].strip(), html.unescape(row[1]).strip(), row[2].strip()))
        except csv.Error as e:
            raise SourceError(f"annotation file {path} line {reader.line_num}: {e}") from e
    if not rows:
        raise SourceError(f"annotation file {path} has no rows")
    return rows


def in_val(file_name: str) -> bool:
    digest = hashlib.sha256(file_name.encode()).digest()
    return int.from_bytes(digest[:8], "little") % VAL_SHARE == 0
