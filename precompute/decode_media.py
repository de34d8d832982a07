"""Decode video and audio files into what the video and audio experts take: sampled RGB frames, and
a 16 kHz mono waveform (which transformers' ASTFeatureExtractor turns into AST's log-mel fbank).

Video goes through PyAV and audio through soundfile, in process: no ffmpeg executable is needed and
a broken file fails as an exception we can record, not as a child process's exit code. Every way a
clip can be unusable is a `MediaError` whose message is the reason kept in the cache. The rules:

- Frames are sampled by segment (TSN): the clip's N decoded frames are split into T equal
  segments and one frame is taken per segment, its middle one (`uniform`) or one drawn by a
  numpy Generator seeded with `seed` (`random`), so a run is reproducible.
- A clip with fewer frames than asked (N < T) still gives T frames: segments then span less than
  a frame and each takes the frame showing at its middle, so frames repeat, in order (3 frames,
  8 asked: 0 0 0 1 1 2 2 2). N = 0 is an error.
- N is what decodes, not what the header says: Matroska and WebM headers carry no frame count and
  AVI headers can disagree with the stream. Packets are counted first (demuxing, no decoding); if
  fewer frames decode than there were packets, the sampling is redone over those that did.
- The first error the decoder raises ends the clip: the frames before it are real content and
  are sampled as a shorter clip, which is what FFmpeg itself does, silently, with a Matroska or
  WebM file cut short. `decode.py` refuses truncated images because there the alternative is
  grey pixels; here it is fewer, true frames. An error before the first frame, or a file that
  does not open (an MP4 or AVI cut before its index), is a MediaError.
- Audio is mixed to mono by averaging channels and resampled with `scipy.signal.resample_poly`:
  a polyphase FIR filter (Kaiser window) at the exact rational ratio (44.1 kHz -> 16 kHz is
  160/441). Linear interpolation would be cheaper but does not low-pass, so content above the new
  Nyquist frequency would fold into the 0-8 kHz band the mel filters see. scipy is already a
  dependency; torchaudio is not needed.
- A clip whose loudest sample stays below 1e-4 (-80 dBFS, about 3 steps of 16-bit audio) is refused
  as silent: AST's [CLS] for an all-floor spectrogram is the same meaningless vector for every
  such clip, and a caption for it would be training noise.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import av
import numpy as np
import soundfile

from precompute.decode import MediaError, check_file

SAMPLINGS = ("uniform", "random")
SILENCE_PEAK = 1e-4

# The AST recipe, as ASTFeatureExtractor computes it: Kaldi fbank with 25 ms Hanning windows every
# 10 ms, no dither, log of the mel energies, then padded or cut to the model's frames and normalised
# with AudioSet's mean and std (twice the std, as AST's own dataloader does).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
MASKED = np.float32((0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD))  # raw 0, normalised: what SpecAugment masks with


def decode_video(path: Path | str, num_frames: int, seed: int = 0, sampling: str = "uniform") -> np.ndarray:
    """`num_frames` frames of the clip as uint8 [T, H, W, 3] RGB, sampled as the module describes."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    path = Path(path)
    check_file(path)
    # Everything below is FFmpeg parsing bytes it does not trust; any failure it raises means the
    # same thing for us: this sample is a gap.
    try:
        packet_count = count_video_packets(path)
        indices = frame_indices(packet_count, num_frames, sampling, seed)
        frames, decoded = read_frames(path, indices)
        if len(frames) < len(set(indices)):
            indices = frame_indices(decoded, num_frames, sampling, seed)
            frames, _ = read_frames(path, indices)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot decode video: {type(e).__name__}: {e}") from e
    return np.stack([frames[i] for i in indices])


def open_video(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise MediaError(f"not a video: FFmpeg cannot open it ({e.strerror})") from None
    if not container.streams.video:
        container.close()
        raise MediaError("not a video: the file has no video stream")
    return container


def count_video_packets(path: Path) -> int:
    """Frames in the first video stream, counted from its packets without decoding them."""
    with open_video(path) as container:
        count = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size > 0)
    if count == 0:
        raise MediaError("no video frames: the video stream holds no packets")
    return count


def frame_indices(frame_count: int, num_frames: int, sampling: str, seed: int) -> list[int]:
    """One frame index per segment of [0, frame_count): its middle, or a seeded draw from it."""
    bounds = np.arange(num_frames + 1) * frame_count / num_frames
    starts = np.floor(bounds[:-1]).astype(int)
    if sampling == "uniform":
        return np.floor((bounds[:-1] + bounds[1:]) / 2).astype(int).tolist()
    ends = np.maximum(np.floor(bounds[1:]).astype(int), starts + 1)
    return np.random.default_rng(seed).integers(starts, ends).tolist()


def read_frames(path: Path, indices: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """The frames at `indices` that decode, as RGB arrays, and how many frames were decoded.

    Every frame up to the last wanted one is decoded (inter-coded video can only be entered at a
    keyframe), but only the wanted ones are converted to RGB. All take the size of the first one
    kept, in case the stream changes resolution midway.
    """
    wanted = set(indices)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    size: tuple[int, int] | None = None
    decoded = 0
    with open_video(path) as container:
        try:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                decoded = index + 1
                if index in wanted:
                    size = size or (frame.width, frame.height)
                    frames[index] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                if index == last:
                    break
        except av.error.FFmpegError as e:
            if decoded == 0:
                raise MediaError(f"no decodable video frames: {e.strerror}") from None
    return frames, decoded


def decode_audio(path: Path | str, sample_rate: int = 16000) -> np.ndarray:
    """The clip as float32 mono [samples] at `sample_rate` (integer PCM scaled to [-1, 1])."""
    path = Path(path)
    check_file(path)
    try:
        samples, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise MediaError(f"not readable audio: {e}") from None
    except Exception as e:
        raise MediaError(f"cannot decode audio: {type(e).__name__}: {e}") from e
    if samples.shape[0] == 0:
        raise MediaError("no audio samples")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise MediaError("unsupported: audio samples that are NaN or infinite")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise MediaError(f"silent: peak amplitude {peak:.1e} is below {SILENCE_PEAK:.0e}")
    return resample(mono, file_rate, sample_rate)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return waveform.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # here: listing a dataset must not import scipy.signal

    common = gcd(from_rate, to_rate)
    return resample_poly(waveform, to_rate // common, from_rate // common).astype(np.float32)


def mask_fbank(features: np.ndarray, rng: np.random.Generator, freqm: int, timem: int) -> np.ndarray:
    """AST's training-time SpecAugment on a normalised fbank [frames, bins]: one band of up to
    `freqm` mel bins and one span of up to `timem` frames, drawn as torchaudio's
    FrequencyMasking / TimeMasking draw them (width uniform in [0, max), start uniform in what is
    left), set to what raw 0 normalises to: AST masks with 0 before it normalises.
    """
    masked = features.copy()
    for axis, max_width in ((1, freqm), (0, timem)):
        width = rng.random() * max_width
        start = rng.random() * (features.shape[axis] - width)
        along = masked if axis == 0 else masked.T  # a view: writing it writes `masked`
        along[int(start) : int(start + width)] = MASKED
    return masked
