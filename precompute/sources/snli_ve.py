"""`snli-ve`: SNLI-VE visual entailment, a Flickr30k image as premise and a sentence as hypothesis.

    DATA_ROOT/
      snli_ve_train.jsonl        one SNLI pair per line, as NEC Labs publish them (github.com/
      snli_ve_dev.jsonl          necla-ml/SNLI-VE): "pairID", "sentence1" (the caption SNLI
      snli_ve_test.jsonl         wrote its premise from), "sentence2" (the hypothesis),
                                 "gold_label", "Flickr30K_ID" ("3416050480")
      flickr30k-images/3416050480.jpg     the Flickr30k images (or flickr30k_images/, or image_dir=PATH)

Files made by the first release of the generator name the image "Flikr30kID" ("3416050480.jpg");
both spellings are read. Splits are the dataset's own (no image shared between them); `val` is its
`dev`. Labels: entailment 0, neutral 1, contradiction 2 (SNLI's order); the published files hold
no pair without a gold label.

One sample per PAIR, keyed by SNLI's pairID ("3416050480.jpg#4r1n"): the task classifies a pair,
and MoPE prompts the image encoder with the pair's text, so nothing per image can be shared
(about 18 pairs per image, 530k train pairs over 29.8k images). Annotations: {"text": the
hypothesis, "label", "sentence1": the caption premise (not an input of the task), "image_id"}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import Sample, Source, SourceError, entries_of, sorted_by_key

LABELS = ("entailment", "neutral", "contradiction")
SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # ours -> the file names'
IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images")  # Flickr30k's tarball, then Kaggle's copy


class SnliVeSource(Source):
    name: ClassVar[str] = "snli-ve"
    description: ClassVar[str] = (
        "SNLI-VE: DATA_ROOT/snli_ve_{train,dev,test}.jsonl over DATA_ROOT/flickr30k-images/ "
        "(option image_dir); one sample per image-hypothesis pair, 3 labels; val = dev"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = tuple(SPLIT_NAMES)

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        image_dir: Path | str | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        self.pairs_file = self.data_root / f"snli_ve_{SPLIT_NAMES[split]}.jsonl"
        if not self.pairs_file.is_file():
            raise SourceError(f"snli-ve: annotation file {self.pairs_file} not found")
        self.image_dir = self.find_folder(
            "Flickr30k image", image_dir, [self.data_root / folder for folder in IMAGE_FOLDERS], "image_dir"
        )

    def samples(self) -> list[Sample]:
        index_of = {label: i for i, label in enumerate(LABELS)}
        samples = []
        for line_number, pair in read_jsonl(self.pairs_file):
            with entries_of(self.pairs_file):
                image_id = image_id_of(pair)
                label = pair["gold_label"]
                if label not in index_of:
                    raise SourceError(
                        f"annotation file {self.pairs_file} line {line_number}: gold_label "
                        f"{label!r} is not one of {', '.join(LABELS)}"
                    )
                samples.append(
                    Sample(
                        key=str(pair["pairID"]),
                        media=str(self.image_dir / f"{image_id}.jpg"),
                        annotations={
                            "text": str(pair["sentence2"]).strip(),
                            "label": index_of[label],
                            "sentence1": str(pair["sentence1"]).strip(),
                            "image_id": image_id,
                        },
                    )
                )
        if not samples:
            raise SourceError(f"annotation file {self.pairs_file} has no pairs")
        return sorted_by_key(samples, self.pairs_file)

    def image_file(self, sample: Sample) -> Path:
        return Path(sample.media)

    def info(self) -> dict:
        return {
            **super().info(),
            "annotation_file": str(self.pairs_file),
            "image_dir": str(self.image_dir),
            "classes": list(LABELS),
            "multi_label": False,
        }


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line, streamed: the train file is 530k pairs with parses."""
    with path.open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"annotation file {path} line {line_number} is not valid JSON: {e}") from e
            if not isinstance(entry, dict):
                raise SourceError(f"annotation file {path} line {line_number} is not a JSON object")
            yield line_number, entry


def image_id_of(pair: dict) -> str:
    """The Flickr30k id under either published spelling, without the '.jpg' the first one had."""
    for field in ("Flickr30K_ID", "Flikr30kID"):
        if field in pair:
            return str(pair[field]).removesuffix(".jpg")
    raise KeyError("Flickr30K_ID")
