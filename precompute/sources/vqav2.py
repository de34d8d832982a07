"""`vqav2`: the VQA v2 question/answer files over their COCO images, as visualqa.org ships them.

    DATA_ROOT/
      v2_OpenEnded_mscoco_train2014_questions.json     (unzipped v2_Questions_Train_mscoco.zip)
      v2_mscoco_train2014_annotations.json             (unzipped v2_Annotations_Train_mscoco.zip)
      v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
      v2_OpenEnded_mscoco_test2015_questions.json      (test: questions only, answers withheld)
      v2_OpenEnded_mscoco_test-dev2015_questions.json
      train2014/COCO_train2014_000000458752.jpg        (the COCO images; test/test-dev: test2015/)
      val2014/...

`image_dir=PATH` points at the COCO image folder of the split when it lives elsewhere.

One sample per IMAGE, not per question: features are computed per image, and each image has
several questions (5.4 on average). Key: the COCO image id zero-padded to 12 digits. Annotations:
{"image_id", "questions": [{"question_id", "question", "answers": [10 strings], "answer_type",
"multiple_choice_answer"}]}, questions sorted by id; on test splits only id and question.

Nothing goes missing silently: an image that is not on disk is a recorded gap at decode (its
questions stay in the split's annotations), and answers whose question is not in the question
file, which cannot be placed, are counted in `info()` (`answers_without_question`, and a note the
run prints). Image paths are built from the integer image id, so no entry can point outside
the image folder.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import (
    Sample,
    Source,
    SourceError,
    entries_of,
    read_json,
    require_list,
    sorted_by_key,
)

# split -> (name in the question file, COCO image folder); test-dev's images are test2015's.
SPLIT_FILES = {
    "train": ("train2014", "train2014"),
    "val": ("val2014", "val2014"),
    "test": ("test2015", "test2015"),
    "test-dev": ("test-dev2015", "test2015"),
}


class Vqav2Source(Source):
    name: ClassVar[str] = "vqav2"
    description: ClassVar[str] = (
        "VQA v2: DATA_ROOT/v2_OpenEnded_mscoco_{split}2014_questions.json + "
        "v2_mscoco_{split}2014_annotations.json over DATA_ROOT/{split}2014/ COCO images; "
        "one sample per image"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = tuple(SPLIT_FILES)

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        image_dir: Path | str | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        subtype, image_folder = SPLIT_FILES[split]
        self.image_folder = image_folder
        self.questions_file = self.data_root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        self.annotations_file = (
            self.data_root / f"v2_mscoco_{subtype}_annotations.json"
            if split in ("train", "val")
            else None
        )
        for path in (self.questions_file, self.annotations_file):
            if path is not None and not path.is_file():
                raise SourceError(f"vqav2: {path} not found")
        self.image_dir = self.find_folder("image", image_dir, [self.data_root / image_folder], "image_dir")
        # What planning could not place, for info().
        self.counted: dict[str, int] | None = None
        self.notes: list[str] = []

    def samples(self) -> list[Sample]:
        questions = require_list(read_json(self.questions_file), "questions", self.questions_file)
        answers_by_question = self._answers_by_question()
        questions_by_image: dict[int, list[dict]] = defaultdict(list)
        with entries_of(self.questions_file):
            asked = {int(q["question_id"]) for q in questions}
            unplaced = 0 if answers_by_question is None else len(answers_by_question.keys() - asked)
            self.counted = {"answers_without_question": unplaced}
            self.notes = [
                f"{unplaced} answer entr{'y' if unplaced == 1 else 'ies'} of {self.annotations_file} name a "
                f"question_id that is not in {self.questions_file}; left out"
            ] if unplaced else []
            for q in sorted(questions, key=lambda q: q["question_id"]):
                entry = {"question_id": int(q["question_id"]), "question": q["question"]}
                if answers_by_question is not None:
                    if entry["question_id"] not in answers_by_question:
                        raise SourceError(
                            f"{self.annotations_file} has no answers for question "
                            f"{entry['question_id']} of {self.questions_file}"
                        )
                    entry.update(answers_by_question[entry["question_id"]])
                questions_by_image[int(q["image_id"])].append(entry)
        samples = [
            Sample(
                key=f"{image_id:012d}",
                media=str(self.image_dir / f"COCO_{self.image_folder}_{image_id:012d}.jpg"),
                annotations={"image_id": image_id, "questions": image_questions},
            )
            for image_id, image_questions in questions_by_image.items()
        ]
        return sorted_by_key(samples, self.questions_file)

    def _answers_by_question(self) -> dict[int, dict] | None:
        """question_id -> its ten human answers and types; None where the split withholds them."""
        path = self.annotations_file
        if path is None:
            return None
        annotations = require_list(read_json(path), "annotations", path)
        with entries_of(path):
            return {
                int(a["question_id"]): {
                    "answers": [answer["answer"] for answer in a["answers"]],
                    "answer_type": a["answer_type"],
                    "multiple_choice_answer": a["multiple_choice_answer"],
                }
                for a in annotations
            }

    def image_file(self, sample: Sample) -> Path:
        return Path(sample.media)

    def info(self) -> dict:
        if self.counted is None:
            self.samples()
        return {
            **super().info(),
            **self.counted,
            "notes": list(self.notes),
            "questions_file": str(self.questions_file),
            "annotations_file": (
                None if self.annotations_file is None else str(self.annotations_file)
            ),
            "image_dir": str(self.image_dir),
        }
