"""`shapes-video`: the `shapes` world set in motion, the video source that needs no data at all.

It is to the video experts and eP-ALM's video leg what `shapes` is to the image side: a dataset
small enough for tests and a laptop, whose questions mean something. Each clip is the `shapes`
scene of the same (seed, split, index), drawn by `ShapesWorld` with its colours, shapes and
paint, whose objects slide in straight lines:

- Each object moves left, right, up or down, drawn uniformly and independently from a stream of
  its own ("motion"), so the still scenes of `shapes` are unchanged and every direction is equally
  likely for every colour and shape. Whatever a question names, its answer cannot be guessed blind.
- An object covers 20-30% of the image over the clip at constant speed. The scene's position is
  the middle of its path, moved inward just enough for the whole path to stay inside the image:
  every object is whole in every frame. Paths may cross; later-drawn objects pass in front.
- Direction questions ("which way is the red circle moving?", "is the red circle moving up?", yes
  half the time) need two frames: one frame shows where an object is, not where it goes. The
  count question ("how many shapes are there?") is kept because one frame answers it, which is
  the contrast an image-encoder baseline should show.
- The clip is `num_frames_total` frames; `load_video` samples from it with `decode_media`'s
  segment rule (`frame_indices`), exactly as a decoded file of that many frames would be sampled,
  so an expert cannot tell a rendered clip from a video file.
- The background noise is the same in every frame (a static camera), and the printed word some
  `shapes` scenes carry is left out: shapes would slide under it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from precompute import decode_media
from precompute.decode import MediaError
from precompute.sources.base import Sample
from precompute.sources.shapes import (
    ANSWERS_PER_QUESTION,
    COLORS,
    COUNT_WORDS,
    DEFAULT_SCENES,
    MAX_SCENES,
    Scene,
    ShapesWorld,
    as_int,
    enumerate_phrases,
    name,
    noun_phrase,
)
from precompute.sources.videos import VideoSource

# Unit steps in image coordinates (y grows downwards), in the order of the motion labels.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MIN_TRAVEL, MAX_TRAVEL = 0.2, 0.3  # path length over the clip, fraction of the image (13-19 px at 64 px)
DEFAULT_FRAMES_TOTAL = 16
MAX_FRAMES_TOTAL = 1024

# The words the motion captions and questions add to the `shapes` vocabulary.
MOTION_WORDS = "which way moving moves going"


@dataclass(frozen=True)
class Motion:
    direction: str  # a key of DIRECTIONS
    x0: float  # centre in the first frame, fractions of the image
    y0: float
    travel: float  # distance covered from the first frame to the last, fraction of the image

    def centre(self, progress: float) -> tuple[float, float]:
        """The centre at `progress` (0 = first frame, 1 = last frame)."""
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.travel * progress, self.y0 + dy * self.travel * progress


class ShapesVideoWorld(ShapesWorld):
    """`ShapesWorld`'s scenes with a straight-line motion per object; questions ask about motion."""

    def scene(self, split: str, index: int) -> Scene:
        return replace(super().scene(split, index), sign=None)

    def motions(self, scene: Scene) -> tuple[Motion, ...]:
        """One motion per object, in scene order."""
        rng = self._rng(scene.split, scene.index, "motion")
        motions = []
        for obj in scene.objects:
            direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
            travel = float(rng.uniform(MIN_TRAVEL, MAX_TRAVEL))
            dx, dy = DIRECTIONS[direction]
            reach = obj.size / 2 + travel / 2  # from the middle of the path to the image edge it must not pass
            mid_x = obj.x if dx == 0 else float(np.clip(obj.x, reach, 1 - reach))
            mid_y = obj.y if dy == 0 else float(np.clip(obj.y, reach, 1 - reach))
            motions.append(Motion(direction, mid_x - dx * travel / 2, mid_y - dy * travel / 2, travel))
        return tuple(motions)

    def render_clip(self, scene: Scene, motions: tuple[Motion, ...], total_frames: int) -> np.ndarray:
        """The clip as uint8 [total_frames, H, W, 3]: each frame the scene with its objects moved."""
        if total_frames < 2:
            raise ValueError(f"a clip needs at least 2 frames to show motion, got total_frames={total_frames}")
        if len(motions) != len(scene.objects):
            raise ValueError(f"{len(motions)} motions for a scene of {len(scene.objects)} objects")
        frames = []
        for t in range(total_frames):
            progress = t / (total_frames - 1)
            moved = []
            for obj, motion in zip(scene.objects, motions):
                x, y = motion.centre(progress)
                moved.append(replace(obj, x=x, y=y))
            frames.append(np.asarray(self.render(replace(scene, objects=tuple(moved)))))
        return np.stack(frames)

    def captions(self, scene: Scene) -> list[str]:
        """Three captions naming every object and its direction."""
        objects, motions = scene.objects, self.motions(scene)
        count = len(objects)
        moving = enumerate_phrases([f"{noun_phrase(o)} moving {m.direction}" for o, m in zip(objects, motions)])
        moves = enumerate_phrases([f"the {name(o)} moves {m.direction}" for o, m in zip(objects, motions)])
        going = enumerate_phrases([f"{noun_phrase(o)} going {m.direction}" for o, m in zip(objects, motions)])
        shapes_word = "shape" if count == 1 else "shapes"
        return [moving, moves, f"{COUNT_WORDS[count]} {shapes_word} on a gray background, {going}"]

    def questions(self, scene: Scene) -> list[dict]:
        """Which way one object moves, whether one moves a given way, and the count."""
        rng = self._rng(scene.split, scene.index, "motion-questions")
        objects, motions = scene.objects, self.motions(scene)
        which = int(rng.integers(len(objects)))
        asked = [(f"which way is the {name(objects[which])} moving?", motions[which].direction, "other")]
        which = int(rng.integers(len(objects)))
        actual = motions[which].direction
        if rng.random() < 0.5:
            direction, answer = actual, "yes"
        else:
            others = [d for d in DIRECTIONS if d != actual]
            direction, answer = others[int(rng.integers(len(others)))], "no"
        asked.append((f"is the {name(objects[which])} moving {direction}?", answer, "yes/no"))
        asked.append(("how many shapes are there?", str(len(objects)), "number"))
        return [
            {"question": q, "answers": [a] * ANSWERS_PER_QUESTION, "answer_type": t}
            for q, a, t in asked
        ]

    def motion_labels(self, scene: Scene) -> dict:
        """Targets for pretraining a tiny video encoder on this world.

        direction: per colour in COLORS order, 0 = absent, 1-4 = left, right, up, down.
        """
        direction = [0] * len(COLORS)
        for obj, motion in zip(scene.objects, self.motions(scene)):
            direction[COLORS.index(obj.color)] = 1 + list(DIRECTIONS).index(motion.direction)
        return {"direction": direction}

    def vocabulary(self) -> list[str]:
        return sorted(set(super().vocabulary()) | set(MOTION_WORDS.split()) | set(DIRECTIONS))


class ShapesVideoSource(VideoSource):
    name: ClassVar[str] = "shapes-video"
    description: ClassVar[str] = (
        "synthetic coloured shapes moving left/right/up/down, with captions and VQA questions about "
        "their motion; no data root (options: num, seed, image_size, num_frames_total)"
    )
    needs_data_root: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = tuple(DEFAULT_SCENES)

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        num: int | str | None = None,
        seed: int | str = 0,
        image_size: int | str = 64,
        num_frames_total: int | str = DEFAULT_FRAMES_TOTAL,
        **options,
    ):
        super().__init__(data_root, split, **options)
        self.num = DEFAULT_SCENES[split] if num is None else as_int("num", num, 1, MAX_SCENES)
        self.num_frames_total = as_int("num_frames_total", num_frames_total, 2, MAX_FRAMES_TOTAL)
        self.world = ShapesVideoWorld(
            seed=as_int("seed", seed, 0, 2**63 - 1),
            image_size=as_int("image_size", image_size, 8, 4096),
        )

    def samples(self) -> list[Sample]:
        samples = []
        for index in range(self.num):
            scene = self.world.scene(self.split, index)
            samples.append(
                Sample(
                    key=f"shapes-video-{self.split}-{index:06d}",
                    media=f"{self.split}/{index}",
                    annotations={
                        "captions": self.world.captions(scene),
                        "questions": self.world.questions(scene),
                        "labels": self.world.motion_labels(scene),
                    },
                )
            )
        return samples

    def load_video(
        self, sample: Sample, num_frames: int, seed: int = 0, sampling: str = "uniform"
    ) -> np.ndarray:
        """`num_frames` of the rendered clip, chosen as from a decoded file of num_frames_total frames."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        if sampling not in decode_media.SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(decode_media.SAMPLINGS)}, got {sampling!r}")
        split, _, index = sample.media.partition("/")
        if split not in self.splits or not index.isdigit():
            raise MediaError(f"not a shapes-video locator (expected 'SPLIT/INDEX'): {sample.media!r}")
        scene = self.world.scene(split, int(index))
        clip = self.world.render_clip(scene, self.world.motions(scene), self.num_frames_total)
        return clip[decode_media.frame_indices(self.num_frames_total, num_frames, sampling, seed)]

    def info(self) -> dict:
        return {
            **super().info(),
            "num": self.num,
            "seed": self.world.seed,
            "image_size": self.world.image_size,
            "num_frames_total": self.num_frames_total,
        }
