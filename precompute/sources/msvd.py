"""`msvd`: MSVD-QA's questions over the MSVD (YouTube2Text) clips.

    DATA_ROOT/
      train_qa.json, val_qa.json, test_qa.json   MSVD-QA (Xu et al. 2017), MSRVTT-QA's format:
                                                  [{"question", "answer", "video_id": 1, "id",
                                                  "category_id"}]
      youtube_mapping.txt                         one "<clip name> vid<N>" line per clip
      YouTubeClips/-4wsuPCjDBc_5_15.avi           (youtubeclips.zip unpacked); or videos/all/
                                                  (eP-ALM's layout) or videos/; `video_dir=`

MSVD-QA numbers videos 1..1970; youtube_mapping.txt turns `vid<N>` into the clip's file name.
A question about a video the mapping does not list is a planning error (the files do not belong
together); a listed clip missing from the folder is a gap recorded when it is decoded.

One sample per clip. Key: the clip name ("-4wsuPCjDBc_5_15"), the name every MSVD derivative
uses. Annotations: {"video_id": N, "questions": [...]} in `vqav2`'s question format (see msrvtt).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from precompute.sources.base import Sample, SourceError, sorted_by_key
from precompute.sources.msrvtt import qa_questions_by_video
from precompute.sources.videos import VideoSource


class MsvdSource(VideoSource):
    name: ClassVar[str] = "msvd"
    description: ClassVar[str] = (
        "MSVD-QA: DATA_ROOT/{split}_qa.json + youtube_mapping.txt over "
        "DATA_ROOT/YouTubeClips/<clip>.avi; one sample per clip"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        video_dir: Path | str | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        self.qa_file = self.data_root / f"{split}_qa.json"
        self.mapping_file = self.data_root / "youtube_mapping.txt"
        for path in (self.qa_file, self.mapping_file):
            if not path.is_file():
                raise SourceError(f"msvd: {path} not found")
        self.video_dir = self.find_folder(
            "video", video_dir, [self.data_root / name for name in ("YouTubeClips", "videos/all", "videos")], "video_dir"
        )

    def samples(self) -> list[Sample]:
        clip_names = read_mapping(self.mapping_file)
        samples = []
        for video_id, questions in qa_questions_by_video(self.qa_file).items():
            if video_id not in clip_names:
                raise SourceError(
                    f"{self.qa_file} asks about video {video_id}, which {self.mapping_file} "
                    f"does not list (no 'vid{video_id}' line)"
                )
            name = clip_names[video_id]
            samples.append(
                Sample(
                    key=name,
                    media=str(self.video_dir / f"{name}.avi"),
                    annotations={"video_id": video_id, "questions": questions},
                )
            )
        return sorted_by_key(samples, self.qa_file)

    def info(self) -> dict:
        return {
            **super().info(),
            "qa_file": str(self.qa_file),
            "mapping_file": str(self.mapping_file),
            "video_dir": str(self.video_dir),
        }


def read_mapping(path: Path) -> dict[int, str]:
    """youtube_mapping.txt -> {N: clip name} from its "<clip name> vid<N>" lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text: {e}") from e
    names: dict[int, str] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].startswith("vid") or not fields[1][3:].isdigit():
            raise SourceError(f"{path}, line {number}: expected '<clip name> vid<N>', got {line!r}")
        video_id = int(fields[1][3:])
        if video_id in names:
            raise SourceError(f"{path}, line {number}: vid{video_id} is listed twice")
        names[video_id] = fields[0]
    if len(set(names.values())) < len(names):
        raise SourceError(f"{path} maps two vid<N> to the same clip name")
    return names
