"""`timesformer-cls`, `ast-cls` and `vit-avg-cls` on tiny real transformers / timm models saved to disk
and loaded by path, over tiny clips written here with PyAV and soundfile; and every expert's
augmented views (`views=V`: ast-cls, timesformer-cls, vit-cls, image-pooled)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTForAudioClassification,
    ASTModel,
    TimesformerConfig,
    TimesformerForVideoClassification,
    TimesformerModel,
    VideoMAEImageProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cache_schema import SplitReader, validate_cache
from conftest import write_images
from precompute.decode_media import MASKED, decode_audio
from precompute.experts import ExpertError
from precompute.experts.image_pooled import ImagePooledExpert
from precompute.experts.video_audio import AstClsExpert, TimesformerClsExpert, VitAvgClsExpert
from precompute.experts.views import EPALM_IMAGE_OPS, EpalmImageRandAugment
from precompute.experts.vit_cls import VitClsExpert
from precompute.sources import MediaError
from precompute.sources.images import ImagesSource
from precompute.sources.shapes import ShapesSource
from precompute.sources.videos import AudioFolderSource, VideoFolderSource
from test_media import frame_numbers, write_tone, write_video

# 128 mel bins at 16 kHz leave one filter empty, as in Kaldi and AST; the extractor warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")

SIDE, WIDTH, DEPTH, TRAINED_FRAMES = 32, 32, 6, 4


def save_tiny_timesformer(path: Path, processor: bool = True) -> Path:
    """A video classifier, as the hub's K-600 checkpoint is; the expert loads its encoder."""
    torch.manual_seed(0)
    config = TimesformerConfig(image_size=SIDE, patch_size=8, num_frames=TRAINED_FRAMES, hidden_size=WIDTH,
                               num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=2 * WIDTH, num_labels=3)
    TimesformerForVideoClassification(config).save_pretrained(path)
    if processor:
        VideoMAEImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                               image_mean=[0.45] * 3, image_std=[0.225] * 3).save_pretrained(path)
    return path


def save_tiny_ast(path: Path, **extractor: float) -> Path:
    """An audio classifier over 128 frames x 128 bins, with the AudioSet feature extractor unless told otherwise."""
    torch.manual_seed(0)
    config = ASTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=2 * WIDTH,
                       max_length=128, num_mel_bins=128, patch_size=16, frequency_stride=16, time_stride=16, num_labels=3)
    model = ASTForAudioClassification(config)
    embeddings = model.audio_spectrogram_transformer.embeddings
    with torch.no_grad():  # initialised to zeros, the two would be the same token; trained, they are not
        embeddings.cls_token.normal_()
        embeddings.distillation_token.normal_()
    model.save_pretrained(path)
    ASTFeatureExtractor(max_length=128, **extractor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def timesformer_dir(tmp_path_factory) -> Path:
    return save_tiny_timesformer(tmp_path_factory.mktemp("models") / "tiny-timesformer")


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory) -> Path:
    return save_tiny_ast(tmp_path_factory.mktemp("models") / "tiny-ast")


def loaded(expert_class, model: Path, **options):
    expert = expert_class(model=str(model), **options)
    expert.load()
    return expert


def features(expert, source, samples) -> np.ndarray:
    return expert.predict(torch.stack([expert.preprocess(expert.read_input(source, s)) for s in samples]), {})["cls"]


def video_folder(root: Path) -> VideoFolderSource:
    write_video(root / "long.mp4", 20)
    write_video(root / "short.mp4", 3)
    return VideoFolderSource(root, "all")


# --- timesformer-cls ------------------------------------------------------------------------


def test_timesformer_cls_is_the_per_layer_cls_after_the_final_layernorm(tmp_path, timesformer_dir):
    source = video_folder(tmp_path / "videos")
    samples = source.samples()
    expert = loaded(TimesformerClsExpert, timesformer_dir, num_frames=TRAINED_FRAMES, levels=3)
    cls = features(expert, source, samples)
    assert cls.shape == (2, 3, WIDTH) and cls.dtype == np.float16 and np.isfinite(cls).all()
    assert not np.allclose(cls[:, 0], cls[:, 2], atol=1e-2)
    np.testing.assert_array_equal(features(expert, source, samples), cls)

    pixels = torch.stack([expert.preprocess(expert.read_input(source, s)) for s in samples])
    with torch.no_grad():
        reference = TimesformerModel.from_pretrained(timesformer_dir).eval()(pixels).last_hidden_state[:, 0]
    np.testing.assert_allclose(cls[:, -1], reference.numpy(), atol=2e-3)

    spec = expert.spec("timesformer-cls")
    assert spec.array("cls").shape == (3, WIDTH) and spec.array("cls").dtype == "float16"
    assert spec.params == {"layers": [3, 4, 5], "width": WIDTH, "num_blocks": DEPTH, "num_frames": TRAINED_FRAMES,
                           "sampling": "uniform", "trained_num_frames": TRAINED_FRAMES, "image_processor": "checkpoint"}
    random = TimesformerClsExpert(model=str(timesformer_dir), num_frames=TRAINED_FRAMES, levels=3, sampling="random")
    random.load()
    assert random.spec("timesformer-cls").preprocess_hash != spec.preprocess_hash


def test_frames_are_normalised_with_the_checkpoints_statistics_or_imagenets(tmp_path, timesformer_dir):
    grey = np.full((TRAINED_FRAMES, 48, 64, 3), 100, np.uint8)
    pixels = loaded(TimesformerClsExpert, timesformer_dir, num_frames=TRAINED_FRAMES).preprocess(grey)
    assert pixels.shape == (TRAINED_FRAMES, 3, SIDE, SIDE)
    np.testing.assert_allclose(pixels, (100 / 255 - 0.45) / 0.225, atol=1e-5)

    bare = loaded(TimesformerClsExpert, save_tiny_timesformer(tmp_path / "bare", processor=False))
    assert bare.spec("timesformer-cls").params["image_processor"] == "imagenet-default"
    expected = (100 / 255 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    np.testing.assert_allclose(bare.preprocess(grey)[:, :, 5, 7], np.tile(expected, (TRAINED_FRAMES, 1)), atol=1e-5)


def test_another_frame_count_interpolates_time_embeddings_as_the_original_timesformer(tmp_path, timesformer_dir):
    """8 frames into a 4-frame checkpoint must equal an 8-frame model whose time embeddings are the
    4 trained ones, nearest-interpolated (each repeated twice); transformers alone gets it wrong."""
    source = video_folder(tmp_path / "videos")
    expert = loaded(TimesformerClsExpert, timesformer_dir, num_frames=8)
    pixels = torch.stack([expert.preprocess(expert.read_input(source, s)) for s in source.samples()])
    cls = expert.predict(pixels, {})["cls"]
    assert expert.spec("timesformer-cls").params["trained_num_frames"] == TRAINED_FRAMES

    trained = TimesformerModel.from_pretrained(timesformer_dir).eval()
    state = trained.state_dict()
    state["embeddings.time_embeddings"] = state["embeddings.time_embeddings"].repeat_interleave(2, dim=1)
    eight = TimesformerModel(TimesformerConfig(**{**trained.config.to_dict(), "num_frames": 8})).eval()
    eight.load_state_dict(state)
    with torch.no_grad():
        reference = eight(pixels).last_hidden_state[:, 0]
        unpatched = trained(pixels).last_hidden_state[:, 0]
    np.testing.assert_allclose(cls[:, -1], reference.numpy(), atol=2e-3)
    assert not np.allclose(unpatched.numpy(), reference.numpy(), atol=1e-2)


def test_timesformer_views_are_one_seeded_draw_per_clip_shared_by_its_frames(tmp_path, timesformer_dir):
    """`views=2`: the clean clip first, as without views; then two augmented clips, each one crop /
    flip / RandAugment draw applied to every frame (a clip of one repeated frame stays one repeated
    frame), the same on a rerun; the encoder's [CLS] of each, stored as `views` [V, K, D]."""
    source = video_folder(tmp_path / "videos")
    samples = source.samples()
    clean = loaded(TimesformerClsExpert, timesformer_dir, num_frames=TRAINED_FRAMES, levels=2)
    expert = loaded(TimesformerClsExpert, timesformer_dir, num_frames=TRAINED_FRAMES, levels=2, views=2)
    inputs = [expert.preprocess(expert.read_input(source, s)) for s in samples]
    assert inputs[0].shape == (3, TRAINED_FRAMES, 3, SIDE, SIDE)
    torch.testing.assert_close(inputs[0][0], clean.preprocess(clean.read_input(source, samples[0])), rtol=0, atol=0)
    torch.testing.assert_close(expert.preprocess(expert.read_input(source, samples[0])), inputs[0], rtol=0, atol=0)
    assert not torch.equal(inputs[0][1], inputs[0][0]) and not torch.equal(inputs[0][1], inputs[0][2])

    still = np.repeat(expert.read_input(source, samples[0])[:1], TRAINED_FRAMES, axis=0)
    for view in expert.preprocess(still)[1:]:
        assert all(torch.equal(frame, view[0]) for frame in view[1:])  # one draw for all the frames

    arrays = expert.predict(torch.stack(inputs), {})
    np.testing.assert_array_equal(arrays["cls"], features(clean, source, samples))
    assert arrays["views"].shape == (2, 2, 2, WIDTH) and arrays["views"].dtype == np.float16
    np.testing.assert_array_equal(arrays["views"][:, 1], clean.predict(torch.stack([x[2] for x in inputs]), {})["cls"])
    spec = expert.spec("timesformer-cls")
    assert [(a.name, a.shape) for a in spec.arrays] == [("cls", (2, WIDTH)), ("views", (2, 2, WIDTH))]
    assert spec.params["views"] == 2 and spec.preprocess_hash != clean.spec("timesformer-cls").preprocess_hash
    with pytest.raises(ExpertError, match="timesformer-cls: views must be at least 0, got -1"):
        TimesformerClsExpert(model=str(timesformer_dir), views=-1)


def test_a_short_clip_repeats_frames_and_still_gives_features(tmp_path, timesformer_dir):
    source = video_folder(tmp_path / "videos")
    short = next(s for s in source.samples() if s.key == "short")
    expert = loaded(TimesformerClsExpert, timesformer_dir, num_frames=8)
    frames = expert.read_input(source, short)
    assert frame_numbers(frames) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert np.isfinite(expert.predict(expert.preprocess(frames)[None], {})["cls"]).all()


# --- ast-cls --------------------------------------------------------------------------------


def test_ast_cls_reads_the_fbank_and_keeps_the_cls_not_the_distillation_token(tmp_path, ast_dir):
    write_tone(tmp_path / "audio" / "a.wav", 440, 22050, seconds=1.5)
    write_tone(tmp_path / "audio" / "b.flac", 3000, 16000, channels=2)
    source = AudioFolderSource(tmp_path / "audio", "all")
    samples = source.samples()
    expert = loaded(AstClsExpert, ast_dir, levels=2)
    spectrograms = torch.stack([expert.preprocess(expert.read_input(source, s)) for s in samples])
    assert spectrograms.shape == (2, 128, 128) and spectrograms.dtype == torch.float32
    extractor = ASTFeatureExtractor(max_length=128)  # the AudioSet recipe (its defaults), at the tiny model's size
    expected = extractor(decode_audio(samples[0].media), sampling_rate=16000, return_tensors="np")["input_values"][0]
    np.testing.assert_array_equal(spectrograms[0], expected)

    cls = expert.predict(spectrograms, {})["cls"]
    assert cls.shape == (2, 2, WIDTH) and cls.dtype == np.float16
    np.testing.assert_array_equal(features(expert, source, samples), cls)
    with torch.no_grad():
        tokens = ASTModel.from_pretrained(ast_dir).eval()(spectrograms).last_hidden_state
    np.testing.assert_allclose(cls[:, -1], tokens[:, 0].numpy(), atol=2e-3)
    assert not np.allclose(cls[:, -1], tokens[:, 1].numpy(), atol=1e-2)
    assert expert.spec("ast-cls").params == {"layers": [4, 5], "width": WIDTH, "num_blocks": DEPTH,
                                             "num_mel_bins": 128, "max_length": 128}


def noisy_tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    noise = 0.01 * np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * frequency * t) + noise).astype(np.float32)


def test_ast_input_is_the_kaldi_fbank_padded_or_cut_and_normalised_like_ast(ast_dir):
    expert = loaded(AstClsExpert, ast_dir, levels=2)
    features = expert.preprocess(noisy_tone(0.5)).numpy()
    assert features.shape == (128, 128) and features.dtype == np.float32
    frames = 1 + (8000 - 400) // 160  # Kaldi's snip_edges count: 48
    np.testing.assert_allclose(features[frames:], MASKED, rtol=1e-6)  # padding is raw 0, normalised
    assert not np.allclose(features[frames - 1], MASKED)
    assert expert.preprocess(noisy_tone(2.0)).shape == (128, 128)  # 198 frames, cut
    with pytest.raises(MediaError, match="too short: 399 samples"):
        expert.preprocess(np.ones(399, np.float32))


def test_ast_input_puts_a_tone_in_the_mel_bin_centred_on_it(ast_dir):
    """Kaldi's mel scale is 1127 ln(1 + f/700), 128 bins evenly spaced in it from 20 Hz to 8 kHz."""
    expert = loaded(AstClsExpert, ast_dir, levels=2)
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    centres_mel = mel(20.0) + (np.arange(128) + 1) * (mel(8000.0) - mel(20.0)) / 129
    for frequency in (440.0, 3000.0):
        expected = int(np.argmin(np.abs(centres_mel - mel(frequency))))
        features = expert.preprocess(noisy_tone(1.0, frequency)).numpy()
        assert abs(int(np.argmax(features[:98].mean(axis=0))) - expected) <= 1


def test_a_checkpoint_without_a_feature_extractor_gets_the_audioset_recipe(ast_dir, tmp_path):
    bare = tmp_path / "bare-ast"
    bare.mkdir()
    for path in ast_dir.iterdir():
        if path.name != "preprocessor_config.json":
            (bare / path.name).write_bytes(path.read_bytes())
    waveform = noisy_tone(1.0)
    own = loaded(AstClsExpert, ast_dir, levels=2).preprocess(waveform)
    np.testing.assert_array_equal(loaded(AstClsExpert, bare, levels=2).preprocess(waveform), own)


def test_ast_cls_views_are_the_clean_cls_plus_seeded_spec_augment_views(tmp_path, ast_dir):
    write_tone(tmp_path / "audio" / "a.wav", 440, 16000, seconds=1.5)
    write_tone(tmp_path / "audio" / "b.wav", 2000, 16000, seconds=1.5)
    source = AudioFolderSource(tmp_path / "audio", "all")
    samples = source.samples()
    clean = loaded(AstClsExpert, ast_dir, levels=2)
    expert = loaded(AstClsExpert, ast_dir, levels=2, views=3, freqm=24, timem=40)

    inputs = [expert.preprocess(expert.read_input(source, s)) for s in samples]
    assert inputs[0].shape == (4, 128, 128)
    np.testing.assert_array_equal(inputs[0][0], clean.preprocess(clean.read_input(source, samples[0])))
    masked_value = np.float32(4.2677393 / (2 * 4.5689974))  # raw 0 under AudioSet's mean and std: (0 - mean) / (2 std)
    assert masked_value == MASKED
    for view in inputs[0][1:]:
        changed = (view != inputs[0][0]).numpy()
        assert changed.any() and (view.numpy()[changed] == masked_value).all()
        band, span = changed.all(axis=0), changed.all(axis=1)  # one band of bins, one span of frames, no more
        np.testing.assert_array_equal(changed, band[None, :] | span[:, None])
        for masked, max_width in ((band, 24), (span, 40)):
            where = np.flatnonzero(masked)
            assert len(where) < max_width and (len(where) == 0 or np.ptp(where) == len(where) - 1)
    assert not torch.equal(inputs[0][1], inputs[0][2])  # each view its own masks
    torch.testing.assert_close(expert.preprocess(expert.read_input(source, samples[0])), inputs[0], rtol=0, atol=0)
    assert not torch.equal(inputs[0][1], inputs[1][1])  # seeded by the clip, not by its position

    arrays = expert.predict(torch.stack(inputs), {})
    np.testing.assert_array_equal(arrays["cls"], features(clean, source, samples))
    assert arrays["views"].shape == (2, 3, 2, WIDTH) and arrays["views"].dtype == np.float16
    np.testing.assert_array_equal(arrays["views"][:, 1], clean.predict(torch.stack([x[2] for x in inputs]), {})["cls"])
    spec = expert.spec("ast-cls")
    assert [(a.name, a.shape) for a in spec.arrays] == [("cls", (2, WIDTH)), ("views", (3, 2, WIDTH))]
    assert spec.params["views"] == 3 and spec.preprocess_hash != clean.spec("ast-cls").preprocess_hash
    with pytest.raises(ExpertError, match="views must be at least 0"):
        AstClsExpert(model=str(ast_dir), views=-1)


def test_a_checkpoint_normalised_otherwise_is_refused(tmp_path):
    with pytest.raises(ExpertError, match="differs from the AudioSet fbank recipe.*'mean': -6.8"):
        loaded(AstClsExpert, save_tiny_ast(tmp_path / "speech", mean=-6.8, std=5.6))


# --- vit-cls and image-pooled views ---------------------------------------------------------


@pytest.mark.parametrize("expert_class, array", [(VitClsExpert, "cls"), (ImagePooledExpert, "pooled")])
def test_image_views_are_seeded_epalm_augmentations_beside_the_clean_feature(tiny_vit_dir, expert_class, array):
    """`views=3`: the clean input first, exactly as without views; then three augmented ones (eP-ALM's
    crop / flip / RandAugment), each different, the same on a rerun and in any thread, seeded by the
    image (another image gets other draws) and the view's index (views=2 is the first two of views=3)."""
    source = ShapesSource(None, "val", num=3, image_size=48)
    images = [source.load_image_tensor(sample) for sample in source.samples()]
    clean = loaded(expert_class, tiny_vit_dir)
    expert = loaded(expert_class, tiny_vit_dir, views=3)
    inputs = [expert.preprocess(image) for image in images]
    assert inputs[0].shape == (4, 3, 32, 32)
    torch.testing.assert_close(inputs[0][0], clean.preprocess(images[0]), rtol=0, atol=0)
    views = inputs[0][1:]
    assert all(not torch.equal(view, inputs[0][0]) for view in views)
    assert all(not torch.equal(views[i], views[j]) for i in range(3) for j in range(i))
    with ThreadPoolExecutor(4) as pool:  # decode threads draw side by side: the same bytes as one by one
        for again, first in zip(pool.map(expert.preprocess, images * 3), inputs * 3):
            torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(inputs[1][1], inputs[0][1])
    two = loaded(expert_class, tiny_vit_dir, views=2)
    torch.testing.assert_close(two.preprocess(images[0]), inputs[0][:3], rtol=0, atol=0)

    arrays = expert.predict(torch.stack(inputs), {})
    np.testing.assert_array_equal(arrays[array], clean.predict(torch.stack([clean.preprocess(i) for i in images]), {})[array])
    shape = clean.spec(expert_class.name).array(array).shape
    assert arrays["views"].shape == (3, 3, *shape) and arrays["views"].dtype == np.float16
    assert not np.array_equal(arrays["views"][:, 0], arrays[array])
    assert not np.array_equal(arrays["views"][:, 0], arrays["views"][:, 1])
    spec = expert.spec(expert_class.name)
    assert [(a.name, a.shape) for a in spec.arrays] == [(array, shape), ("views", (3, *shape))]
    assert spec.params["views"] == 3 and "views" not in clean.spec(expert_class.name).params
    assert spec.preprocess_hash != clean.spec(expert_class.name).preprocess_hash
    with pytest.raises(ExpertError, match=f"{expert_class.name}: views must be at least 0, got -1"):
        expert_class(model=str(tiny_vit_dir), views=-1)


def test_the_image_randaugment_draws_from_the_authors_ten_ops():
    """eP-ALM's RandomAugment(2, 7, augs=[...]) ops, all of them torchvision's (a rename there fails here)."""
    assert sorted(EpalmImageRandAugment._AUGMENTATION_SPACE) == sorted(EPALM_IMAGE_OPS)


# --- vit-avg-cls ----------------------------------------------------------------------------


def test_vit_avg_cls_is_the_mean_of_the_frames_vit_cls(tmp_path, tiny_vit_dir):
    source = video_folder(tmp_path / "videos")
    samples = source.samples()
    expert = loaded(VitAvgClsExpert, tiny_vit_dir, num_frames=4)
    cls = features(expert, source, samples)
    assert cls.shape == (2, 6, 32) and cls.dtype == np.float16

    per_image = loaded(VitClsExpert, tiny_vit_dir)
    for sample, clip in zip(samples, cls):
        frames = expert.read_input(source, sample)
        rows = per_image.predict(torch.stack([per_image.preprocess(Image.fromarray(f)) for f in frames]), {})["cls"]
        np.testing.assert_array_equal(clip, rows.astype(np.float32).mean(axis=0).astype(np.float16))

    spec, image_spec = expert.spec("vit-avg-cls"), per_image.spec("vit-cls")
    assert spec.params == {**image_spec.params, "num_frames": 4, "sampling": "uniform", "frame_pooling": "mean"}
    assert spec.array("cls") == image_spec.array("cls") and spec.preprocess_hash != image_spec.preprocess_hash


# --- refusals and gaps ----------------------------------------------------------------------


def test_bad_options_and_models_are_refused(tmp_path, timesformer_dir, ast_dir):
    for expert_class in (TimesformerClsExpert, VitAvgClsExpert):
        with pytest.raises(ExpertError, match="num_frames must be at least 1"):
            expert_class(num_frames=0)
        with pytest.raises(ExpertError, match="sampling must be one of uniform, random"):
            expert_class(sampling="dense")
    with pytest.raises(ExpertError, match="levels=7 but .* has 6 layers"):
        loaded(TimesformerClsExpert, timesformer_dir, levels=7)
    with pytest.raises(ExpertError, match="is a 'audio-spectrogram-transformer' model"):
        loaded(TimesformerClsExpert, ast_dir)
    cropped = save_tiny_timesformer(tmp_path / "cropped", processor=False)
    VideoMAEImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": 24, "width": 24}).save_pretrained(cropped)
    with pytest.raises(ExpertError, match=r"makes frames \(3, 24, 24\), but the model's layers assume \(3, 32, 32\)"):
        loaded(TimesformerClsExpert, cropped)
    with pytest.raises(ExpertError, match="no such model directory"):
        loaded(AstClsExpert, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertError, match="no config.json"):
        loaded(AstClsExpert, tmp_path / "empty")


def test_unusable_clips_and_sources_are_media_errors(tmp_path, timesformer_dir, ast_dir):
    timesformer = TimesformerClsExpert(model=str(timesformer_dir))
    ast = AstClsExpert(model=str(ast_dir))
    write_images(tmp_path / "images", 1)
    images = ImagesSource(tmp_path / "images", "all")
    with pytest.raises(MediaError, match="timesformer-cls reads video, but source 'images' holds no videos"):
        timesformer.read_input(images, images.samples()[0])
    with pytest.raises(MediaError, match="ast-cls reads audio, but source 'images' holds no audio"):
        ast.read_input(images, images.samples()[0])

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    videos = VideoFolderSource(tmp_path / "videos", "all")
    with pytest.raises(MediaError, match="not a video"):
        timesformer.read_input(videos, videos.samples()[0])

    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "silent.wav", np.zeros(16000), 16000)
    soundfile.write(tmp_path / "audio" / "blip.wav", np.full(100, 0.5), 16000)
    audio = AudioFolderSource(tmp_path / "audio", "all")
    blip, silent = audio.samples()
    with pytest.raises(MediaError, match="silent"):
        ast.read_input(audio, silent)
    ast.load()
    with pytest.raises(MediaError, match="too short"):
        ast.preprocess(ast.read_input(audio, blip))


# --- through the engine ---------------------------------------------------------------------

def gap_reasons(cache: Path, source: str, feature: str) -> dict[str, str]:
    records = [json.loads(p.read_text()) for p in sorted((cache / source / "all" / "_commits" / feature).glob("*.json"))]
    return {key: reason for record in records for key, reason in record["invalid"].items()}


def write_videos(root: Path) -> None:
    write_video(root / "long.mp4", 20)
    write_video(root / "short.mp4", 3)
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())


def write_audio(root: Path) -> None:
    write_tone(root / "tone.wav", 440, 16000)
    soundfile.write(root / "silent.wav", np.zeros(16000), 16000)
    (root / "noise.wav").write_bytes(b"RIFF not really a wave file")


@pytest.mark.parametrize("expert, source, write, usable, reasons", [
    ("timesformer-cls", "videos", write_videos, {"long": True, "noise": False, "short": True}, {"noise": "not a video"}),
    ("ast-cls", "audio", write_audio, {"noise": False, "silent": False, "tone": True},
     {"noise": "not readable audio", "silent": "silent"}),
])
def test_broken_and_silent_clips_are_gaps_through_the_engine(tmp_path, timesformer_dir, ast_dir, ray_local, expert,
                                                              source, write, usable, reasons):
    from precompute.engine import RunConfig, run

    write(tmp_path / source)
    model = {"timesformer-cls": timesformer_dir, "ast-cls": ast_dir}[expert]
    config = RunConfig(experts=[expert], source=source, data_root=str(tmp_path / source), split="all",
                       cache=str(tmp_path / "cache"), models={expert: str(model)}, shard_size=2, batch_size=2, workers=1)
    [summary] = run(config, progress=False)
    assert (summary.samples, summary.invalid, summary.shards_failed) == (3, len(reasons), [])

    reader = SplitReader(tmp_path / "cache", source, "all")
    feature = reader.feature(expert)
    assert dict(zip(reader.keys, feature.usable)) == usable
    recorded = gap_reasons(tmp_path / "cache", source, expert)
    assert set(recorded) == set(reasons) and all(reasons[key] in recorded[key] for key in reasons)
    for key in (key for key, ok in usable.items() if ok):
        cls = feature.get_by_key(key)["cls"]
        assert cls.shape == (6, WIDTH) and cls.dtype == np.float16 and np.isfinite(cls).all() and cls.any()


def test_image_views_through_the_engine_are_stored_beside_the_clean_feature_and_rerun_byte_identical(
        tmp_path, tiny_vit_dir, ray_local):
    """`--expert-opt views=2` on vit-cls: `views` [N, 2, K, D] float16 in the cache, next to the clean
    `cls` a run without views writes (the same bytes); a second run into another cache writes the same
    checksums, and the cache validates."""
    from precompute.engine import RunConfig, run

    def precompute(cache: Path, **options) -> SplitReader:
        config = RunConfig(experts=["vit-cls"], source="shapes", split="val", cache=str(cache), shard_size=4,
                           batch_size=2, workers=1, models={"vit-cls": str(tiny_vit_dir)},
                           source_options={"num": 6, "image_size": 32}, expert_options={"vit-cls": options})
        [summary] = run(config, progress=False)
        assert (summary.samples, summary.invalid, summary.shards_failed) == (6, 0, [])
        return SplitReader(cache, "shapes", "val")

    views, again, plain = (precompute(tmp_path / name, **options)
                           for name, options in (("views", {"views": 2}), ("again", {"views": 2}), ("plain", {})))
    stored = views.feature("vit-cls")
    assert [(a.name, a.shape, a.dtype) for a in stored.spec.arrays] == [("cls", (6, 32), "float16"),
                                                                       ("views", (2, 6, 32), "float16")]
    assert stored.read("views").shape == (6, 2, 6, 32)
    np.testing.assert_array_equal(stored.read("cls"), plain.feature("vit-cls").read("cls"))
    assert not np.array_equal(stored.read("views")[:, 0], stored.read("cls"))
    records = [sorted((cache / "shapes" / "val" / "_commits" / "vit-cls").glob("*.json"))
               for cache in (tmp_path / "views", tmp_path / "again")]
    assert [json.loads(r.read_text())["checksum"] for r in records[0]] == \
        [json.loads(r.read_text())["checksum"] for r in records[1]]
    np.testing.assert_array_equal(again.feature("vit-cls").read("views"), stored.read("views"))
    assert validate_cache(tmp_path / "views")[1] == []
