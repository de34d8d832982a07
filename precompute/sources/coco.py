"""`coco`: MS-COCO images with their captions, in the layout cocodataset.org publishes.

    DATA_ROOT/
      annotations/captions_train2017.json    (or captions_train2014.json, ...)
      annotations/captions_val2017.json
      train2017/000000391895.jpg             (2014: train2014/COCO_train2014_000000391895.jpg)
      val2017/...
      dataset_coco.json                      optional: Karpathy's split file

Official splits are `train` and `val`; the year is found on disk (2017 first, then 2014) unless
`year=` says which. Captioning papers (Prismer, eP-ALM) instead report on Karpathy's split of the
2014 images (113k train+restval / 5k val / 5k test). When `dataset_coco.json` is at DATA_ROOT or
given as `karpathy=PATH`, the splits are Karpathy's `train`/`val`/`test`/`restval`, with the raw
text of its sentences as captions; `karpathy=False` ignores a file found at DATA_ROOT. Karpathy's
file names the 2014 folders; when only the 2017 folders are on disk the same images are found
there (2017 train+val is exactly 2014 train+val, renamed and regrouped).

Key: the COCO image id, zero-padded to 12 digits as in the 2017 file names ("000000391895").

An image entry whose `file_name` (Karpathy: `filepath`/`filename`) leads outside the image folder
(`../x.jpg`, `/etc/x.jpg`) is never read: it stays in the split as a recorded gap whose reason
names it, so one bad entry costs one sample, not the dataset. Captions whose `image_id` is not
among the file's images cannot be placed; they are counted in `info()` and printed by the run.
Both counts are `notes` of `info()`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import (
    MediaError,
    Sample,
    Source,
    SourceError,
    entries_of,
    path_inside,
    read_json,
    require_list,
    sorted_by_key,
)

YEARS = ("2017", "2014")
OFFICIAL_SPLITS = ("train", "val")


class CocoSource(Source):
    name: ClassVar[str] = "coco"
    description: ClassVar[str] = (
        "MS-COCO captions: DATA_ROOT/annotations/captions_{split}{year}.json + "
        "DATA_ROOT/{split}{year}/; Karpathy splits (train/val/test/restval) with "
        "DATA_ROOT/dataset_coco.json or karpathy=PATH"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test", "restval")

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        year: int | str | None = None,
        karpathy: Path | str | bool | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        # What planning left out, for info(): counts, and the lines the run prints.
        self.counted: dict[str, int] = {}
        self.notes: list[str] = []
        if year is not None and str(year) not in YEARS:
            raise SourceError(f"coco: year must be one of {', '.join(YEARS)}, got {year!r}")
        self.karpathy_file = self._find_karpathy_file(karpathy)
        if self.karpathy_file is None:
            if split not in OFFICIAL_SPLITS:
                raise SourceError(
                    f"coco: split '{split}' exists only in Karpathy's split file; put "
                    f"dataset_coco.json in {self.data_root} or pass karpathy=PATH"
                )
            self.year = self._find_official_year(year)
            self.annotation_file = (
                self.data_root / "annotations" / f"captions_{split}{self.year}.json"
            )
            self.image_dir = self._require_dir(self.data_root / f"{split}{self.year}")
        else:
            self.year = str(year) if year is not None else self._find_karpathy_year()
            self.annotation_file = self.karpathy_file

    def _find_karpathy_file(self, karpathy: Path | str | bool | None) -> Path | None:
        if karpathy is False:
            return None
        if karpathy is None or karpathy is True:
            candidate = self.data_root / "dataset_coco.json"
            if candidate.is_file():
                return candidate
            if karpathy is True:
                raise SourceError(f"coco: Karpathy split file {candidate} not found")
            return None
        path = Path(karpathy).expanduser().absolute()
        if not path.is_file():
            raise SourceError(f"coco: Karpathy split file {path} not found")
        return path

    def _find_official_year(self, year: int | str | None) -> str:
        candidates = YEARS if year is None else (str(year),)
        tried = []
        for candidate in candidates:
            path = self.data_root / "annotations" / f"captions_{self.split}{candidate}.json"
            if path.is_file():
                return candidate
            tried.append(str(path))
        raise SourceError(
            f"coco: no caption file for split '{self.split}'; looked for {', '.join(tried)}"
        )

    def _find_karpathy_year(self) -> str:
        for candidate in ("2014", "2017"):
            if any((self.data_root / f"{s}{candidate}").is_dir() for s in OFFICIAL_SPLITS):
                return candidate
        raise SourceError(
            f"coco: no image folder in {self.data_root}; expected train2014/ and val2014/ "
            "(or train2017/ and val2017/)"
        )

    def _require_dir(self, path: Path) -> Path:
        if not path.is_dir():
            raise SourceError(f"coco: image folder {path} not found")
        return path

    def samples(self) -> list[Sample]:
        self.counted: dict[str, int] = {}
        self.notes: list[str] = []
        if self.karpathy_file is None:
            return self._official_samples()
        return self._karpathy_samples()

    def _official_samples(self) -> list[Sample]:
        path = self.annotation_file
        document = read_json(path)
        images = require_list(document, "images", path)
        annotations = require_list(document, "annotations", path)
        captions: dict[int, list[str]] = defaultdict(list)
        samples = []
        with entries_of(path):
            for annotation in sorted(annotations, key=lambda a: a["id"]):
                captions[int(annotation["image_id"])].append(annotation["caption"].strip())
            for image in images:
                image_id = int(image["id"])
                samples.append(
                    Sample(
                        key=f"{image_id:012d}",
                        media=os.path.join(self.image_dir, image["file_name"]),
                        annotations={"captions": captions.get(image_id, []), "image_id": image_id},
                    )
                )
        image_ids = {s.annotations["image_id"] for s in samples}
        orphans = sum(len(c) for image_id, c in captions.items() if image_id not in image_ids)
        self.counted["captions_without_image"] = orphans
        if orphans:
            self.notes.append(f"{orphans} caption(s) of {path} name an image_id that is not in its images; left out")
        return self._outside_noted(sorted_by_key(samples, path))

    def _outside_noted(self, samples: list[Sample]) -> list[Sample]:
        """`samples`, after counting those whose file name leaves the image folder (gaps at decode)."""
        outside = [s for s in samples if path_inside(self._media_root(), s.media) is None]
        self.counted["paths_outside_image_folder"] = len(outside)
        if outside:
            self.notes.append(
                f"{len(outside)} image(s) of {self.annotation_file} have a file name leading outside "
                f"{self._media_root()} (first: {outside[0].key} -> {outside[0].media}); recorded as gaps, not read"
            )
        return samples

    def _media_root(self) -> Path:
        """The folder every image of the split must be inside: the split's image folder, or with
        Karpathy's file (which names the 2014 folders) the data root."""
        return self.data_root if self.karpathy_file is not None else self.image_dir

    def _karpathy_samples(self) -> list[Sample]:
        path = self.karpathy_file
        images = require_list(read_json(path), "images", path)
        image_path = self._karpathy_image_locator()
        samples = []
        with entries_of(path):
            for image in images:
                if image["split"] != self.split:
                    continue
                image_id = int(image["cocoid"])
                samples.append(
                    Sample(
                        key=f"{image_id:012d}",
                        media=os.fspath(image_path(image)),
                        annotations={
                            "captions": [s["raw"].strip() for s in image["sentences"]],
                            "image_id": image_id,
                        },
                    )
                )
        return self._outside_noted(sorted_by_key(samples, path))

    def _karpathy_image_locator(self):
        """Where an entry of Karpathy's file lives on this disk (its own 2014 path, or 2017's)."""
        if self.year == "2014":
            return lambda image: os.path.join(self.data_root, image["filepath"], image["filename"])
        train_dir = self._require_dir(self.data_root / "train2017")
        val_dir = self._require_dir(self.data_root / "val2017")
        in_val = set(os.listdir(val_dir))

        def locate(image: dict) -> Path:
            file_name = f"{int(image['cocoid']):012d}.jpg"
            return (val_dir if file_name in in_val else train_dir) / file_name

        return locate

    def image_file(self, sample: Sample) -> Path:
        path = path_inside(self._media_root(), sample.media)
        if path is None:
            raise MediaError(f"file name leads outside the image folder {self._media_root()}: {sample.media}; not read")
        return path

    def info(self) -> dict:
        if not self.counted:
            self.samples()
        return {
            **super().info(),
            "annotation_file": str(self.annotation_file),
            "karpathy": self.karpathy_file is not None,
            "year": self.year,
            **self.counted,
            "notes": list(self.notes),
        }
