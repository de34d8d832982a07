"""`audiocaps`: AudioCaps (Kim et al. 2019) 10-second AudioSet clips with their captions.

    DATA_ROOT/
      train.csv, val.csv, test.csv     audiocap_id,youtube_id,start_time,caption (one row per
                                       caption), as github.com/cdjkim/audiocaps publishes them;
                                       also found in DATA_ROOT/dataset/, the repository's folder
      audio/<split>/                   the clips, which everyone downloads from YouTube themselves;
                                       or audios/<split>/ (eP-ALM's layout) or <split>/; `audio_dir=`

Download scripts name the clips differently; each clip is looked for, in this order, as
`<youtube_id>_<start_time>` (aac-datasets), `<youtube_id>` (eP-ALM), then `<audiocap_id>` of any of
its captions (the usual yt-dlp one-liners), each with .wav, .flac or .ogg. A clip found under
none of them (YouTube has removed about a tenth of AudioCaps) keeps the `<youtube_id>.wav` path
and is recorded as missing when it is decoded, not refused at planning.

One sample per clip, not per caption: train has one caption per clip, val and test five. Key:
"<youtube_id>_<start_time>", the clip's identity in AudioSet. Annotations: {"youtube_id",
"start_time", "audiocap_ids", "captions"}, captions in audiocap_id order.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from precompute.sources.base import Sample, SourceError, entries_of, sorted_by_key
from precompute.sources.videos import AUDIO_EXTENSIONS, AudioSource

COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


class AudiocapsSource(AudioSource):
    name: ClassVar[str] = "audiocaps"
    description: ClassVar[str] = (
        "AudioCaps: DATA_ROOT/{split}.csv captions over DATA_ROOT/audio/{split}/ clips "
        "(<youtube_id>[_<start>] or <audiocap_id> .wav/.flac/.ogg); one sample per clip"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        audio_dir: Path | str | None = None,
        **options,
    ):
        super().__init__(data_root, split, **options)
        candidates = [self.data_root / f"{split}.csv", self.data_root / "dataset" / f"{split}.csv"]
        self.captions_file = next((path for path in candidates if path.is_file()), None)
        if self.captions_file is None:
            raise SourceError(
                f"audiocaps: caption file not found; looked for {', '.join(map(str, candidates))}"
            )
        self.audio_dir = self.find_folder(
            "audio", audio_dir, [self.data_root / "audio" / split, self.data_root / "audios" / split, self.data_root / split],
            "audio_dir",
        )

    def samples(self) -> list[Sample]:
        path = self.captions_file
        rows = read_csv(path, COLUMNS)
        captions_by_clip: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        with entries_of(path):
            for row in rows:
                clip = (row["youtube_id"].strip(), int(row["start_time"]))
                captions_by_clip[clip].append((int(row["audiocap_id"]), row["caption"].strip()))
        on_disk = set(os.listdir(self.audio_dir))
        samples = []
        for (youtube_id, start_time), captions in captions_by_clip.items():
            captions.sort()
            audiocap_ids = [audiocap_id for audiocap_id, _ in captions]
            stems = [f"{youtube_id}_{start_time}", youtube_id, *map(str, audiocap_ids)]
            file_name = next(
                (stem + ext for stem in stems for ext in AUDIO_EXTENSIONS if stem + ext in on_disk),
                f"{youtube_id}.wav",
            )
            samples.append(
                Sample(
                    key=f"{youtube_id}_{start_time}",
                    media=str(self.audio_dir / file_name),
                    annotations={
                        "youtube_id": youtube_id,
                        "start_time": start_time,
                        "audiocap_ids": audiocap_ids,
                        "captions": [caption for _, caption in captions],
                    },
                )
            )
        return sorted_by_key(samples, path)

    def info(self) -> dict:
        return {
            **super().info(),
            "captions_file": str(self.captions_file),
            "audio_dir": str(self.audio_dir),
        }


def read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header naming at least `columns`; anything else names the file."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(
                    f"annotation file {path} has no column(s) {', '.join(missing)}; "
                    f"its header is {reader.fieldnames}"
                )
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"annotation file {path} is not a readable CSV file: {e}") from e
    return rows
