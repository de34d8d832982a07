"""`msrvtt`: MSR-VTT videos with their captions (Microsoft's release) and MSRVTT-QA's questions.

    DATA_ROOT/
      train_val_videodatainfo.json   {"videos": [{"video_id": "video0", "split": "train"|"validate",
                                      ...}], "sentences": [{"video_id", "caption", "sen_id"}]}
      test_videodatainfo.json        the same for the 2,990 "test" videos
      train_qa.json, val_qa.json, test_qa.json
                                     MSRVTT-QA (Xu et al. 2017): [{"question", "answer",
                                      "video_id": 0, "id", "category_id"}]; `qa_dir=` if elsewhere
      TrainValVideo/video0.mp4       (test: TestVideo/video7010.mp4), as the release unpacks;
                                     or videos/all/ (eP-ALM's layout) or videos/; `video_dir=`

Splits are the official ones (train 6,513 / val 497 / test 2,990 videos), which MSRVTT-QA follows.
Either file kind may be absent: without the info file there are no captions, without the QA file
no questions. When both are there, a QA video outside the info file's split means the two come
from different releases, and is refused. (Retrieval papers' 9k/1k "JSFusion" split is not this.)

One sample per video. Key "video{N}". Annotations: {"video_id": N, "captions": [...] (by sen_id),
"questions": [{"question_id", "question", "answers": [the one answer], "answer_type"}]} (by id):
the question format of `vqav2`, so the same trainer reads both; with one answer per question the
score is exact match, not VQA's leave-one-out accuracy. MSRVTT-QA's questions were generated from
the captions and typed by their question word; `answer_type` is that word (what, who, how, when,
where), "other" if it is none of them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import (
    Sample,
    SourceError,
    entries_of,
    read_json,
    require_list,
    sorted_by_key,
)
from precompute.sources.videos import VideoSource

INFO_FILES = {"train": "train_val_videodatainfo.json", "val": "train_val_videodatainfo.json",
              "test": "test_videodatainfo.json"}
INFO_SPLITS = {"train": "train", "val": "validate", "test": "test"}
VIDEO_FOLDERS = {"train": "TrainValVideo", "val": "TrainValVideo", "test": "TestVideo"}
QUESTION_WORDS = ("what", "who", "how", "when", "where")


class MsrvttSource(VideoSource):
    name: ClassVar[str] = "msrvtt"
    description: ClassVar[str] = (
        "MSR-VTT + MSRVTT-QA: DATA_ROOT/{train_val,test}_videodatainfo.json captions and/or "
        "DATA_ROOT/{split}_qa.json questions over DATA_ROOT/TrainValVideo/ (test: TestVideo/) "
        "video{N}.mp4; one sample per video"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        video_dir: Path | str | None = None,
        qa_dir: Path | str | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        info_file = self.data_root / INFO_FILES[split]
        qa_root = self.data_root if qa_dir is None else Path(qa_dir).expanduser().absolute()
        qa_file = qa_root / f"{split}_qa.json"
        self.info_file = info_file if info_file.is_file() else None
        self.qa_file = qa_file if qa_file.is_file() else None
        if self.info_file is None and self.qa_file is None:
            raise SourceError(
                f"msrvtt: neither the caption file {info_file} nor the MSRVTT-QA file {qa_file} "
                f"is there; split '{split}' needs at least one"
            )
        self.video_dir = self.find_folder(
            "video", video_dir, [self.data_root / name for name in (VIDEO_FOLDERS[split], "videos/all", "videos")], "video_dir"
        )

    def samples(self) -> list[Sample]:
        captions = None if self.info_file is None else self._captions_by_video()
        questions = {} if self.qa_file is None else qa_questions_by_video(self.qa_file)
        if captions is not None:
            strays = sorted(set(questions) - set(captions))
            if strays:
                raise SourceError(
                    f"{self.qa_file} asks about {len(strays)} videos that {self.info_file} does not "
                    f"put in split '{self.split}' (e.g. video{strays[0]}); the two files are from "
                    "different releases or splits"
                )
        video_ids = captions.keys() if captions is not None else questions.keys()
        samples = [
            Sample(
                key=f"video{video_id}",
                media=str(self.video_dir / f"video{video_id}.mp4"),
                annotations={
                    "video_id": video_id,
                    "captions": [] if captions is None else captions[video_id],
                    "questions": questions.get(video_id, []),
                },
            )
            for video_id in video_ids
        ]
        return sorted_by_key(samples, self.info_file or self.qa_file)

    def _captions_by_video(self) -> dict[int, list[str]]:
        """video id -> its captions in sen_id order, for every video of the split."""
        path = self.info_file
        document = read_json(path)
        videos = require_list(document, "videos", path)
        sentences = require_list(document, "sentences", path)
        with entries_of(path):
            captions: dict[int, list[str]] = {
                video_number(v["video_id"]): []
                for v in videos
                if v["split"] == INFO_SPLITS[self.split]
            }
            for sentence in sorted(sentences, key=lambda s: s["sen_id"]):
                video_id = video_number(sentence["video_id"])
                if video_id in captions:
                    captions[video_id].append(sentence["caption"].strip())
        return captions

    def info(self) -> dict:
        return {
            **super().info(),
            "info_file": None if self.info_file is None else str(self.info_file),
            "qa_file": None if self.qa_file is None else str(self.qa_file),
            "video_dir": str(self.video_dir),
        }


def video_number(video_id: str) -> int:
    """MSR-VTT's "video123" -> 123."""
    if not video_id.startswith("video"):
        raise ValueError(f"video id {video_id!r} is not of the form 'video<N>'")
    return int(video_id.removeprefix("video"))


def qa_questions_by_video(path: Path) -> dict[int, list[dict]]:
    """MSRVTT-QA / MSVD-QA file -> video id -> its questions in `vqav2`'s format, sorted by id.

    Both datasets (Xu et al. 2017) share this file format: a list of {"question", "answer",
    "video_id", "id", "category_id"} with one answer per question.
    """
    entries = read_json(path)
    if not isinstance(entries, list):
        raise SourceError(f"annotation file {path} is not a list of questions")
    questions: dict[int, list[dict]] = defaultdict(list)
    with entries_of(path):
        for q in sorted(entries, key=lambda q: q["id"]):
            questions[int(q["video_id"])].append(
                {
                    "question_id": int(q["id"]),
                    "question": q["question"],
                    "answers": [q["answer"]],
                    "answer_type": question_word(q["question"]),
                }
            )
    return dict(questions)


def question_word(question: str) -> str:
    words = question.split(maxsplit=1)
    first = words[0].lower() if words else ""
    return first if first in QUESTION_WORDS else "other"
