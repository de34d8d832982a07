"""`shapes-video`: moving `shapes` scenes whose questions need motion, checked against the rendered
pixels, and run through the real engine as any video source is."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import SplitReader
from precompute.decode_media import frame_indices
from precompute.experts.video_audio import VitAvgClsExpert
from precompute.sources import MediaError, Sample, SourceError
from precompute.sources.shapes import COLORS, PAINT, Scene, ShapesWorld
from precompute.sources.shapes_video import DIRECTIONS, Motion, ShapesVideoSource, ShapesVideoWorld

FRAMES = 16
ROOT = Path(__file__).resolve().parent.parent


def clips(world: ShapesVideoWorld, split: str, count: int) -> Iterator[tuple[Scene, tuple[Motion, ...], np.ndarray]]:
    for index in range(count):
        scene = world.scene(split, index)
        motions = world.motions(scene)
        yield scene, motions, world.render_clip(scene, motions, FRAMES)


# clip_digest's clips, rendered in a fresh interpreter with another hash seed: nothing may depend on the process.
DIGEST_SCRIPT = """
import hashlib, sys
from precompute.sources.shapes_video import ShapesVideoWorld
world = ShapesVideoWorld(seed=int(sys.argv[1]))
digest = hashlib.sha256()
for index in range(5):
    scene = world.scene("train", index)
    digest.update(world.render_clip(scene, world.motions(scene), 16).tobytes())
print(digest.hexdigest())
"""


def clip_digest(seed: int) -> str:
    world = ShapesVideoWorld(seed=seed)
    return hashlib.sha256(b"".join(clip.tobytes() for _, _, clip in clips(world, "train", 5))).hexdigest()


def test_clips_are_deterministic_across_processes_and_differ_by_seed():
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other_process = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, "3"], capture_output=True, text=True,
                                   check=True, cwd=ROOT, env=env).stdout.strip()
    assert other_process == clip_digest(3) == clip_digest(3)
    assert clip_digest(4) != clip_digest(3)

    world = ShapesVideoWorld(seed=3)
    assert world.questions(world.scene("train", 0)) == ShapesVideoWorld(seed=3).questions(world.scene("train", 0))
    assert world.motions(world.scene("train", 0)) != world.motions(world.scene("val", 0))


def test_scenes_are_the_still_worlds_without_the_sign():
    still, moving = ShapesWorld(seed=2), ShapesVideoWorld(seed=2)
    for index in range(20):
        assert moving.scene("test", index).objects == still.scene("test", index).objects
        assert moving.scene("test", index).sign is None


def test_objects_stay_whole_inside_the_image_in_every_frame():
    world = ShapesVideoWorld(image_size=64)
    for scene, motions, clip in clips(world, "train", 100):
        assert clip.shape == (FRAMES, 64, 64, 3) and clip.dtype == np.uint8
        for obj, motion in zip(scene.objects, motions):
            for t in range(FRAMES):
                x, y = motion.centre(t / (FRAMES - 1))
                half = obj.size / 2 - 1e-9  # the path may end exactly at the edge, up to float rounding
                assert half <= min(x, y) and max(x, y) <= 1 - half
        front = scene.objects[-1]  # drawn last, never hidden: all of it is on screen
        mask = (clip == PAINT[front.color]).all(axis=-1)
        widths = [np.ptp(np.nonzero(m.any(axis=0))[0]) for m in mask]
        heights = [np.ptp(np.nonzero(m.any(axis=1))[0]) for m in mask]
        assert max(widths) - min(widths) <= 1 and max(heights) - min(heights) <= 1


def test_the_stated_motion_is_what_the_pixels_show():
    """The frontmost object's centroid, from its paint in each frame, moves the stated way and only that way."""
    world = ShapesVideoWorld(image_size=64)
    for scene, motions, clip in clips(world, "val", 100):
        front, motion = scene.objects[-1], motions[-1]
        mask = (clip == PAINT[front.color]).all(axis=-1)
        centroids = np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(m) for m in mask)])
        step = np.array(DIRECTIONS[motion.direction])
        along = centroids @ step
        across = centroids @ np.abs(step[::-1])
        assert (np.diff(along) >= 0).all()
        assert along[-1] - along[0] == pytest.approx(motion.travel * 64, abs=1)
        assert across.max() - across.min() < 0.5


def answer_from_motion(question: str, scene, motions) -> str:
    """An independent reading of each question against the scene's objects and motions."""
    direction = {f"{o.color} {o.shape}": m.direction for o, m in zip(scene.objects, motions)}
    if m := re.fullmatch(r"which way is the (\w+ \w+) moving\?", question):
        return direction[m[1]]
    if m := re.fullmatch(r"is the (\w+ \w+) moving (\w+)\?", question):
        return "yes" if direction[m[1]] == m[2] else "no"
    if question == "how many shapes are there?":
        return str(len(scene.objects))
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_captions_and_labels_match_the_motion():
    world = ShapesVideoWorld()
    vocabulary = set(world.vocabulary())
    assert set(ShapesWorld().vocabulary()) < vocabulary and set(DIRECTIONS) <= vocabulary
    for index in range(200):
        scene = world.scene("test", index)
        motions = world.motions(scene)
        questions = world.questions(scene)
        assert [q["answer_type"] for q in questions] == ["other", "yes/no", "number"]
        for q in questions:
            assert q["answers"] == [answer_from_motion(q["question"], scene, motions)] * 10
        captions = world.captions(scene)
        assert len(set(captions)) == 3
        for caption in captions:
            for obj, motion in zip(scene.objects, motions):
                assert re.search(rf"{obj.color} {obj.shape} (moving|moves|going) {motion.direction}\b", caption)
        texts = captions + [q["question"] for q in questions] + [q["answers"][0] for q in questions]
        for text in texts:
            assert set(re.findall(r"[a-z0-9]+", text)) <= vocabulary, text
        labels = world.motion_labels(scene)["direction"]
        assert labels == [
            next((1 + list(DIRECTIONS).index(m.direction) for o, m in zip(scene.objects, motions) if o.color == c), 0)
            for c in COLORS
        ]


def questions_of(world: ShapesVideoWorld, split: str, count: int) -> list[dict]:
    return [q for i in range(count) for q in world.questions(world.scene(split, i))]


def best_guess_accuracy(fit_on: list[dict], evaluate_on: list[dict], template) -> float:
    """Accuracy of answering each question with the most common answer of its template in `fit_on`."""
    answers = defaultdict(Counter)
    for q in fit_on:
        answers[template(q)][q["answers"][0]] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in answers.items()}
    return float(np.mean([guess.get(template(q)) == q["answers"][0] for q in evaluate_on]))


def test_answers_are_balanced_and_cannot_be_guessed_blind():
    world = ShapesVideoWorld()
    train, val = questions_of(world, "train", 300), questions_of(world, "val", 300)
    directions = Counter(q["answers"][0] for q in train if q["question"].startswith("which way"))
    assert set(directions) == set(DIRECTIONS)
    assert all(0.2 <= n / 300 <= 0.3 for n in directions.values()), directions
    yes_no = [q["answers"][0] for q in train if q["answer_type"] == "yes/no"]
    assert 0.4 <= yes_no.count("yes") / len(yes_no) <= 0.6

    which_way_train = [q for q in train if q["question"].startswith("which way")]
    which_way_val = [q for q in val if q["question"].startswith("which way")]
    per_question = best_guess_accuracy(which_way_train, which_way_val, lambda q: q["question"])
    per_template = best_guess_accuracy(which_way_train, which_way_train, lambda q: "which way")
    assert per_question <= 0.35 and per_template <= 0.35


def test_a_single_frame_says_less_than_the_clip():
    """From the first frame alone, the best a guesser can do is bet on the side with the most room
    ahead (paths stay in the image); that beats chance but stays far below what the clip shows."""
    world = ShapesVideoWorld()
    hits = []
    for index in range(300):
        scene = world.scene("train", index)
        motion = world.motions(scene)[0]
        room = {"left": motion.x0, "right": 1 - motion.x0, "up": motion.y0, "down": 1 - motion.y0}
        hits.append(max(room, key=room.get) == motion.direction)
    assert np.mean(hits) < 0.5


def test_load_video_samples_the_clip_as_a_decoded_file_would_be():
    source = ShapesVideoSource(None, "val", num=4, seed=1, num_frames_total=12)
    sample = pickle.loads(pickle.dumps(source.samples()[2]))
    world = ShapesVideoWorld(seed=1)
    scene = world.scene("val", 2)
    clip = world.render_clip(scene, world.motions(scene), 12)
    for sampling, seed in (("uniform", 0), ("random", 5)):
        frames = pickle.loads(pickle.dumps(source)).load_video(sample, 8, seed=seed, sampling=sampling)
        np.testing.assert_array_equal(frames, clip[frame_indices(12, 8, sampling, seed)])
    assert source.load_video(sample, 20).shape == (20, 64, 64, 3)  # more than the clip has: frames repeat, in order

    with pytest.raises(MediaError, match="holds videos, not images"):
        source.load_image(sample)
    with pytest.raises(MediaError, match="not a shapes-video locator"):
        source.load_video(Sample("x", "elsewhere/3", {}), 8)
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        source.load_video(sample, 0)


def test_source_samples_info_and_options():
    source = ShapesVideoSource(None, "train", num="5", image_size="32")
    samples = source.samples()
    assert [s.key for s in samples] == [f"shapes-video-train-{i:06d}" for i in range(5)]
    assert set(samples[0].annotations) == {"captions", "questions", "labels"}
    json.dumps([s.annotations for s in samples])
    assert json.loads(json.dumps(source.info())) == {
        "source": "shapes-video", "split": "train", "data_root": None, "num": 5, "seed": 0, "image_size": 32,
        "num_frames_total": 16,
    }
    assert source.load_video(samples[0], 4).shape == (4, 32, 32, 3)
    assert len(ShapesVideoSource(None, "test").samples()) == 200

    with pytest.raises(SourceError, match="num_frames_total must be in 2..1024"):
        ShapesVideoSource(None, "train", num_frames_total=1)
    with pytest.raises(SourceError, match="takes no data root"):
        ShapesVideoSource("/tmp", "train")
    with pytest.raises(SourceError, match="has no option.* frames"):
        ShapesVideoSource(None, "train", frames=8)


def test_vit_avg_cls_runs_on_shapes_video_through_the_engine(tmp_path, tiny_vit_dir, ray_local):
    from precompute.engine import RunConfig, run

    config = RunConfig(experts=["vit-avg-cls"], source="shapes-video", split="val", cache=str(tmp_path / "cache"),
                       models={"vit-avg-cls": str(tiny_vit_dir)}, shard_size=3, batch_size=3, workers=1,
                       source_options={"num": 5}, expert_options={"vit-avg-cls": {"num_frames": 4}})
    [summary] = run(config, progress=False)
    assert (summary.samples, summary.invalid, summary.shards_failed) == (5, 0, [])

    reader = SplitReader(tmp_path / "cache", "shapes-video", "val")
    assert reader.keys == [f"shapes-video-val-{i:06d}" for i in range(5)]
    source = ShapesVideoSource(None, "val", num=5)
    expert = VitAvgClsExpert(model=str(tiny_vit_dir), num_frames=4)
    expert.load()
    batch = torch.stack([expert.preprocess(expert.read_input(source, s)) for s in source.samples()])
    expected = expert.predict(batch, {})["cls"]
    stored = np.stack([reader.feature("vit-avg-cls").get_by_key(key)["cls"] for key in reader.keys])
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=2e-3)
