"""Video and audio decoding and the video/audio sources, on tiny clips written here with PyAV and
soundfile: a square that moves 3 pixels right per frame (so a frame's position says which frame
it is), tones whose frequency must survive resampling, and datasets in their published layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from precompute.decode_media import decode_audio, decode_video, frame_indices
from precompute.sources import MediaError, SourceError
from precompute.sources.audiocaps import AudiocapsSource
from precompute.sources.msrvtt import MsrvttSource
from precompute.sources.msvd import MsvdSource
from precompute.sources.videos import AudioFolderSource, VideoFolderSource

STEP = 3  # pixels the square moves per frame
WIDTH, HEIGHT = 128, 32


def write_video(path: Path, frame_count: int, codec: str = "mpeg4", garbage_packets: int = 0) -> Path:
    """Frame i: black, with a white 8x8 square whose left edge is at x = STEP * i.

    `garbage_packets` appends packets of zeros after the real ones: the container lists them,
    the decoder fails on them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        last = None
        for i in range(frame_count):
            pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            pixels[12:20, STEP * i:STEP * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
                last = packet
        for packet in stream.encode():
            container.mux(packet)
            last = packet
        for k in range(garbage_packets):
            packet = av.Packet(bytes(16))
            packet.stream, packet.time_base, packet.duration = stream, last.time_base, last.duration
            packet.pts = packet.dts = last.pts + (k + 1) * last.duration
            container.mux(packet)
    return path


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Which frame of `write_video` each decoded frame is, from where its square is."""
    numbers = []
    for frame in frames:
        columns = np.flatnonzero(frame[16].mean(axis=-1) > 128)
        numbers.append(round((columns.mean() - 3.5) / STEP))
    return numbers


def write_tone(path: Path, frequency: float, sample_rate: int, seconds: float = 1.0, channels: int = 1,
               amplitude: float = 0.5, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tone = amplitude * np.sin(2 * np.pi * frequency * t)
    soundfile.write(path, np.stack([tone / (c + 1) for c in range(channels)], axis=1), sample_rate, **kwargs)
    return path


def peak_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(waveform.size)))
    return float(np.fft.rfftfreq(waveform.size, 1 / sample_rate)[np.argmax(spectrum)])


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


# --- decode_video ---------------------------------------------------------------------------


def test_uniform_sampling_takes_the_middle_of_each_segment(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 40)
    frames = decode_video(path, 8)
    assert frames.shape == (8, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_numbers(decode_video(path, 1)) == [20]


def test_random_sampling_is_seeded_and_stays_in_its_segment(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 40)
    drawn = [frame_numbers(decode_video(path, 8, seed=seed, sampling="random")) for seed in range(4)]
    assert frame_numbers(decode_video(path, 8, seed=0, sampling="random")) == drawn[0]
    assert drawn[0] == frame_indices(40, 8, "random", 0)
    assert len({tuple(d) for d in drawn}) > 1
    for numbers in drawn:
        assert all(5 * k <= n < 5 * k + 5 for k, n in enumerate(numbers))


@pytest.mark.parametrize(
    "codec, ext",
    [("mpeg4", "mp4"), ("libx264", "mp4"), ("mpeg4", "avi"), ("mpeg4", "mkv"), ("libvpx", "webm"),
     ("mpeg4", "mov")],
)
def test_every_container_is_sampled_from_its_real_frame_count(tmp_path, codec, ext):
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = write_video(tmp_path / f"clip.{ext}", 12, codec)
    assert frame_numbers(decode_video(path, 4)) == [1, 4, 7, 10]


def test_a_short_clip_repeats_its_frames_in_order(tmp_path):
    path = write_video(tmp_path / "short.mp4", 3)
    frames = decode_video(path, 8)
    assert frames.shape[0] == 8
    assert frame_numbers(frames) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_packets_that_do_not_decode_end_the_clip(tmp_path):
    path = write_video(tmp_path / "tail.mkv", 12, garbage_packets=6)
    assert frame_numbers(decode_video(path, 4)) == [1, 4, 7, 10]  # sampled over 12 frames, not 18


def test_broken_videos_are_media_errors(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        decode_video(tmp_path / "absent.mp4", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        decode_video(tmp_path / "empty.mp4", 4)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(MediaError, match="not a video"):
        decode_video(tmp_path / "noise.mp4", 4)
    with pytest.raises(MediaError, match="no video stream"):
        decode_video(write_tone(tmp_path / "tone.wav", 440, 16000), 4)
    whole = write_video(tmp_path / "whole.mp4", 12).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # the MP4 index is at the end
    with pytest.raises(MediaError, match="not a video"):
        decode_video(tmp_path / "cut.mp4", 4)
    with av.open(str(write_video(tmp_path / "whole.mkv", 12))) as container:
        first_packet_at = next(p.pos for p in container.demux(video=0))
    (tmp_path / "header.mkv").write_bytes((tmp_path / "whole.mkv").read_bytes()[:first_packet_at])
    with pytest.raises(MediaError, match="no video frames"):
        decode_video(tmp_path / "header.mkv", 4)


def test_bad_arguments_are_value_errors(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 4)
    with pytest.raises(ValueError, match="num_frames"):
        decode_video(path, 0)
    with pytest.raises(ValueError, match="sampling"):
        decode_video(path, 4, sampling="dense")


# --- decode_audio ---------------------------------------------------------------------------


def test_stereo_tone_is_averaged_and_resampled_keeping_its_frequency(tmp_path):
    path = write_tone(tmp_path / "tone.wav", 440, 22050, channels=2)
    waveform = decode_audio(path)
    assert waveform.shape == (16000,) and waveform.dtype == np.float32
    assert abs(peak_frequency(waveform, 16000) - 440) <= 1
    assert np.abs(waveform[1000:-1000]).max() == pytest.approx(0.5 * (1 + 0.5) / 2, abs=0.01)


@pytest.mark.parametrize("ext, rate", [("flac", 48000), ("ogg", 44100), ("wav", 16000)])
def test_flac_ogg_and_wav_decode(tmp_path, ext, rate):
    waveform = decode_audio(write_tone(tmp_path / f"tone.{ext}", 1000, rate))
    assert waveform.shape == (16000,)
    assert abs(peak_frequency(waveform, 16000) - 1000) <= 1


def test_resampling_filters_what_the_new_rate_cannot_hold(tmp_path):
    """A 10 kHz tone has no place at 16 kHz (Nyquist 8 kHz); interpolating without a low-pass
    filter would fold it to 6 kHz, right in the band the mel filters see."""
    waveform = decode_audio(write_tone(tmp_path / "high.wav", 10000, 44100))
    assert np.sqrt(np.mean(waveform[2000:-2000] ** 2)) < 0.01 * 0.5 / np.sqrt(2)


def test_silent_empty_and_broken_audio_are_media_errors(tmp_path):
    soundfile.write(tmp_path / "zeros.wav", np.zeros(16000), 16000)
    with pytest.raises(MediaError, match="silent"):
        decode_audio(tmp_path / "zeros.wav")
    write_tone(tmp_path / "whisper.wav", 440, 16000, amplitude=5e-5, subtype="FLOAT")
    with pytest.raises(MediaError, match="silent"):
        decode_audio(tmp_path / "whisper.wav")
    soundfile.write(tmp_path / "no_samples.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(MediaError, match="no audio samples"):
        decode_audio(tmp_path / "no_samples.wav")
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(MediaError, match="not readable audio"):
        decode_audio(tmp_path / "noise.wav")
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        decode_audio(tmp_path / "empty.flac")
    with pytest.raises(MediaError, match="file not found"):
        decode_audio(tmp_path / "absent.wav")


# --- videos / audio folders -----------------------------------------------------------------


def test_videos_source_finds_every_extension_recursively(tmp_path):
    write_video(tmp_path / "a.mp4", 4)
    write_video(tmp_path / "deep" / "b.MKV", 4)
    (tmp_path / "deep" / "c.WebM").write_bytes(b"")
    write_video(tmp_path / ".hidden" / "d.mp4", 4)
    (tmp_path / "notes.txt").write_text("not a video")
    source = VideoFolderSource(tmp_path, "all")
    samples = source.samples()
    assert [s.key for s in samples] == ["a", "deep/b", "deep/c"]
    assert source.load_video(samples[1], 2).shape == (2, HEIGHT, WIDTH, 3)
    with pytest.raises(MediaError, match="empty file"):
        source.load_video(samples[2], 2)
    with pytest.raises(MediaError, match="holds videos, not images"):
        source.load_image(samples[0])
    write_video(tmp_path / "a.avi", 4)
    with pytest.raises(SourceError, match="share the sample key 'a'"):
        source.samples()
    (tmp_path / "none").mkdir()
    with pytest.raises(SourceError, match="no .* files under"):
        VideoFolderSource(tmp_path / "none", "all").samples()


def test_audio_source_finds_every_extension_recursively(tmp_path):
    write_tone(tmp_path / "a.wav", 440, 16000)
    write_tone(tmp_path / "b" / "c.FLAC", 440, 32000)
    write_tone(tmp_path / "d.ogg", 440, 44100)
    write_video(tmp_path / "e.mp4", 2)
    source = AudioFolderSource(tmp_path, "all")
    samples = source.samples()
    assert [s.key for s in samples] == ["a", "b/c", "d"]
    assert all(source.load_audio(s).shape == (16000,) for s in samples)
    with pytest.raises(MediaError, match="holds audio clips, not images"):
        source.load_image(samples[0])


# --- msrvtt ---------------------------------------------------------------------------------


def write_msrvtt(root: Path, video_folder: str = "TrainValVideo", info: bool = True) -> None:
    if info:
        videos = [{"video_id": f"video{i}", "split": split, "id": i}
                  for i, split in enumerate(["train", "train", "validate"])]
        sentences = [{"sen_id": 10 - k, "video_id": f"video{k % 3}", "caption": f"caption {10 - k} "}
                     for k in range(6)]
        write_json(root / "train_val_videodatainfo.json", {"videos": videos, "sentences": sentences})
    write_json(root / "train_qa.json", [
        {"question": "what is moving?", "answer": "square", "video_id": 1, "id": 7, "category_id": 0},
        {"question": "who moves?", "answer": "nobody", "video_id": 1, "id": 3, "category_id": 1},
        {"question": "is it white?", "answer": "yes", "video_id": 0, "id": 5, "category_id": 0},
    ])
    write_video(root / video_folder / "video0.mp4", 4)


def test_msrvtt_joins_captions_and_questions_per_video(tmp_path):
    write_msrvtt(tmp_path)
    source = MsrvttSource(tmp_path, "train")
    samples = source.samples()
    assert [s.key for s in samples] == ["video0", "video1"]
    first, second = samples
    assert first.annotations["captions"] == ["caption 7", "caption 10"]  # by sen_id
    assert first.media == str(tmp_path / "TrainValVideo" / "video0.mp4")
    assert second.annotations["questions"] == [
        {"question_id": 3, "question": "who moves?", "answers": ["nobody"], "answer_type": "who"},
        {"question_id": 7, "question": "what is moving?", "answers": ["square"], "answer_type": "what"},
    ]
    assert first.annotations["questions"][0]["answer_type"] == "other"
    assert source.load_video(first, 2).shape == (2, HEIGHT, WIDTH, 3)
    with pytest.raises(MediaError, match="file not found"):
        source.load_video(second, 2)  # listed, never downloaded: a gap, not a planning error
    val = MsrvttSource(tmp_path, "val").samples()
    assert [(s.key, s.annotations["captions"], s.annotations["questions"]) for s in val] == [
        ("video2", ["caption 5", "caption 8"], [])
    ]


def test_msrvtt_without_caption_file_and_in_eps_layout(tmp_path):
    write_msrvtt(tmp_path, video_folder="videos/all", info=False)
    samples = MsrvttSource(tmp_path, "train").samples()
    assert [(s.key, s.annotations["captions"], len(s.annotations["questions"])) for s in samples] == [
        ("video0", [], 1), ("video1", [], 2)
    ]
    assert samples[0].media == str(tmp_path / "videos" / "all" / "video0.mp4")


def test_msrvtt_bad_layouts_are_source_errors(tmp_path):
    write_msrvtt(tmp_path)
    with pytest.raises(SourceError, match="test_videodatainfo.json"):
        MsrvttSource(tmp_path, "test")
    write_json(tmp_path / "val_qa.json", [{"question": "what?", "answer": "a", "video_id": 0, "id": 1}])
    with pytest.raises(SourceError, match="not put in split 'val'"):
        MsrvttSource(tmp_path, "val").samples()
    (tmp_path / "train_val_videodatainfo.json").write_text("{not json")
    with pytest.raises(SourceError, match="train_val_videodatainfo.json is not valid JSON"):
        MsrvttSource(tmp_path, "train").samples()
    clip9 = {"videos": [{"video_id": "clip9", "split": "train"}], "sentences": []}
    write_json(tmp_path / "train_val_videodatainfo.json", clip9)
    with pytest.raises(SourceError, match="train_val_videodatainfo.json: an entry is malformed"):
        MsrvttSource(tmp_path, "train").samples()
    write_json(tmp_path / "train_qa.json", [{"question": "what?", "video_id": 0, "id": 1}])
    (tmp_path / "train_val_videodatainfo.json").unlink()
    with pytest.raises(SourceError, match="train_qa.json: an entry has no field 'answer'"):
        MsrvttSource(tmp_path, "train").samples()
    with pytest.raises(SourceError, match="video folder .* not found"):
        MsrvttSource(tmp_path, "train", video_dir=tmp_path / "elsewhere")


# --- msvd -----------------------------------------------------------------------------------


def test_msvd_maps_video_ids_to_clip_names(tmp_path):
    (tmp_path / "youtube_mapping.txt").write_bytes(b"-4wsuPCjDBc_5_15 vid1\r\nzv2RIbUsnSw_159_169 vid2\r\n")
    write_json(tmp_path / "train_qa.json", [
        {"question": "what is a man doing?", "answer": "cook", "video_id": 2, "id": 0, "category_id": 0},
        {"question": "who is singing?", "answer": "woman", "video_id": 1, "id": 1, "category_id": 1},
    ])
    write_video(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi", 4)
    source = MsvdSource(tmp_path, "train")
    samples = source.samples()
    assert [(s.key, s.annotations["video_id"]) for s in samples] == [("-4wsuPCjDBc_5_15", 1),
                                                                      ("zv2RIbUsnSw_159_169", 2)]
    assert samples[1].annotations["questions"] == [
        {"question_id": 0, "question": "what is a man doing?", "answers": ["cook"], "answer_type": "what"}
    ]
    assert source.load_video(samples[0], 3).shape == (3, HEIGHT, WIDTH, 3)
    with pytest.raises(MediaError, match="file not found"):
        source.load_video(samples[1], 3)

    write_json(tmp_path / "val_qa.json", [{"question": "what?", "answer": "a", "video_id": 3, "id": 0}])
    with pytest.raises(SourceError, match="does not list .*vid3"):
        MsvdSource(tmp_path, "val").samples()
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nbroken line here\n")
    with pytest.raises(SourceError, match="youtube_mapping.txt, line 2"):
        source.samples()
    with pytest.raises(SourceError, match="test_qa.json not found"):
        MsvdSource(tmp_path, "test")


# --- audiocaps ------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["audiocap_id", "youtube_id", "start_time", "caption"], *rows])
    return path


def test_audiocaps_one_sample_per_clip_whatever_the_file_naming(tmp_path):
    write_csv(tmp_path / "val.csv", [
        [12, "--aaa", 30, "a dog barks, then a car passes"],
        [11, "--aaa", 30, "dogs bark"],
        [20, "bbb", 0, "rain"],
        [30, "ccc", 10, "wind"],
        [31, "ccc", 10, "wind blows"],
        [40, "ddd", 50, "gone from youtube"],
    ])
    write_tone(tmp_path / "audio" / "val" / "--aaa.wav", 440, 16000)
    write_tone(tmp_path / "audio" / "val" / "bbb_0.flac", 440, 32000)
    write_tone(tmp_path / "audio" / "val" / "31.wav", 440, 44100)
    source = AudiocapsSource(tmp_path, "val")
    samples = source.samples()
    assert [s.key for s in samples] == ["--aaa_30", "bbb_0", "ccc_10", "ddd_50"]
    assert samples[0].annotations == {"youtube_id": "--aaa", "start_time": 30, "audiocap_ids": [11, 12],
                                      "captions": ["dogs bark", "a dog barks, then a car passes"]}
    assert [Path(s.media).name for s in samples] == ["--aaa.wav", "bbb_0.flac", "31.wav", "ddd.wav"]
    assert all(source.load_audio(s).shape == (16000,) for s in samples[:3])
    with pytest.raises(MediaError, match="file not found"):
        source.load_audio(samples[3])
    with pytest.raises(MediaError, match="holds audio clips"):
        source.load_image(samples[0])


def test_audiocaps_bad_layouts_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="train.csv"):
        AudiocapsSource(tmp_path, "train")
    write_csv(tmp_path / "dataset" / "train.csv", [[1, "aaa", 0, "a sound"]])
    with pytest.raises(SourceError, match="no audio folder for split 'train'"):
        AudiocapsSource(tmp_path, "train")
    (tmp_path / "audios" / "train").mkdir(parents=True)
    assert [s.key for s in AudiocapsSource(tmp_path, "train").samples()] == ["aaa_0"]
    (tmp_path / "dataset" / "train.csv").write_text("id,youtube_id,caption\n1,aaa,a sound\n")
    with pytest.raises(SourceError, match="has no column.*audiocap_id"):
        AudiocapsSource(tmp_path, "train").samples()
    write_csv(tmp_path / "dataset" / "train.csv", [[1, "aaa", "soon", "a sound"]])
    with pytest.raises(SourceError, match="train.csv: an entry is malformed"):
        AudiocapsSource(tmp_path, "train").samples()
