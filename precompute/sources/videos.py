"""Sources of clips rather than images: what a video or audio dataset adds to `Source`, and
`videos` / `audio`, every clip under a folder.

A video source's samples point at video files and are read with `load_video` (sampled frames), an
audio source's with `load_audio` (a mono waveform); `load_image` refuses, so that an image expert
pointed at a video dataset fails on its first sample with a reason instead of guessing a frame.

`videos` and `audio` work as `images` does: every file with a known extension, at any depth, in
any letter case (.MP4 from cameras, .WAV from recorders); the key is the path relative to the data
root without its extension, in posix form; two files that would share a key are refused; hidden
entries (macOS `._x.mp4` forks, `.git`) are skipped; symlinked folders are followed but never
around a loop; a name that is not valid UTF-8 gets a key with %XX escapes, as in `images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from precompute import decode_media
from precompute.decode import MediaError
from precompute.sources.base import Sample, Source
from precompute.sources.images import folder_samples, portable_reasons

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class VideoSource(Source):
    """A source whose samples are video files."""

    def load_image(self, sample: Sample) -> Image.Image:
        raise MediaError(f"source '{self.name}' holds videos, not images")

    def load_video(
        self, sample: Sample, num_frames: int, seed: int = 0, sampling: str = "uniform"
    ) -> np.ndarray:
        """`num_frames` RGB frames [T, H, W, 3] uint8; raises MediaError(reason) when undecodable."""
        with portable_reasons():
            return decode_media.decode_video(Path(sample.media), num_frames, seed=seed, sampling=sampling)


class AudioSource(Source):
    """A source whose samples are audio files."""

    def load_image(self, sample: Sample) -> Image.Image:
        raise MediaError(f"source '{self.name}' holds audio clips, not images")

    def load_audio(self, sample: Sample, sample_rate: int = 16000) -> np.ndarray:
        """The clip as float32 mono at `sample_rate`; raises MediaError(reason) when unusable."""
        with portable_reasons():
            return decode_media.decode_audio(Path(sample.media), sample_rate)


class VideoFolderSource(VideoSource):
    name: ClassVar[str] = "videos"
    description: ClassVar[str] = (
        "every .mp4/.avi/.mkv/.webm/.mov under DATA_ROOT, recursively; no annotations"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("all",)

    def samples(self) -> list[Sample]:
        return folder_samples(self.data_root, VIDEO_EXTENSIONS)


class AudioFolderSource(AudioSource):
    name: ClassVar[str] = "audio"
    description: ClassVar[str] = "every .wav/.flac/.ogg under DATA_ROOT, recursively; no annotations"
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("all",)

    def samples(self) -> list[Sample]:
        return folder_samples(self.data_root, AUDIO_EXTENSIONS)
