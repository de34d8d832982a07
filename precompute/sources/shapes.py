"""`shapes`: a small synthetic world of coloured shapes, the source that needs no data at all.

It is the embedded default: tests, CI and a first run on a laptop exercise the whole pipeline
(experts, cache, every trainer method and metric) without downloading a dataset. It is built so
that training on it means something:

- Everything is a pure function of (seed, split, index), through a SHA-256 of those values (not
  Python's `hash()`, which changes per process), so every worker, machine and rerun agrees on
  every scene, pixel, caption and answer.
- Each scene holds 1-3 objects of distinct colours (shapes may repeat), placed by deterministic
  rejection sampling so they barely overlap, and kept clear of the image's vertical midline and of
  each other horizontally, so "left" and "right" are never a judgement call.
- Questions cannot be answered blind. Yes/no questions are yes half the time, asked colours and
  shapes are uniform, and the asked object always exists; a model that sees only the question does
  little better than chance (the tests hold the best blind guess under 45%).
- Answers are one word; numbers are digits, as VQA's answer normalisation writes them.
- It knows the truth behind every pixel (`ShapesWorld.truth`): objects stand at different
  distances (later-drawn ones nearer), each has a class mask, a box and an outline, and half the
  scenes carry a printed word for OCR. Prismer's stand-in experts are trained on that truth.
- A classification task needs both modalities (`ShapesWorld.fusion`, for MoPE): each scene comes
  with a sentence naming what its pieces are made of (wood, glass or metal), something the picture
  does not show, and the class is (number of objects, material), 9 classes ("one wood" ... "three
  metal"). The material is drawn uniformly and independently of the scene, so the image alone
  (which shows the count) or the text alone (which names the material) reaches about 1/3; both
  together determine the class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from precompute.decode import MediaError
from precompute.sources.base import Sample, Source, SourceError

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")

PAINT = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 200, 20),
    "purple": (135, 60, 175),
    "orange": (245, 130, 25),
}
BACKGROUND_GREY = 232
BACKGROUND_NOISE = 6  # +- grey levels per pixel: images are not byte-identical flat canvases

MAX_OBJECTS = 3
MIN_SIZE, MAX_SIZE = 0.22, 0.34  # object width as a fraction of the image (14-22 px at 64 px)
MIDLINE_CLEARANCE = 0.06  # |x - 0.5| at least this: each object is clearly left or right
MIN_HORIZONTAL_GAP = 0.1  # between centres: "left of" is clear for every pair
PLACEMENT_TRIES = 100

# Printed on half the scenes, away from every object, for OCR to find.
SIGN_WORDS = ("stop", "open", "exit", "sale", "taxi", "hotel", "cafe", "park", "bank", "zoo")
SIGN_PAINT = (30, 30, 30)
SIGN_FONT_FRACTION = 0.19  # font size as a fraction of the image: 12 px at 64 px
SIGN_MARGIN = 0.04  # clear space around the word's ink: pixel rounding never lets it touch an object
NEAREST, FARTHEST = 1.0, 0.35  # inverse depth of the nearest and farthest object; background is 0

SEG_CLASSES = ("background",) + SHAPES
DETECTION_CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
BACKGROUND_INSTANCE = 255

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MATERIALS = ("wood", "glass", "metal")
MATERIAL_TEMPLATES = (
    "a toy set made of {material}",
    "{material} pieces on a table",
    "these shapes are cut from {material}",
    "a puzzle whose pieces are {material}",
    "every piece here is {material}",
)
FUSION_CLASSES = tuple(f"{COUNT_WORDS[n]} {m}" for n in COUNT_WORDS for m in MATERIALS)
SIDES = ("left", "right")
YES_NO = ("yes", "no")
QUESTIONS_PER_SCENE = 5
ANSWERS_PER_QUESTION = 10  # VQA accuracy compares against ten human answers

# Every fixed word of the captions and questions below; `vocabulary()` adds the slot fillers.
TEMPLATE_WORDS = (
    "a an and on the gray background from to of side image single is which there are "
    "what color shape shapes how many object where leftmost rightmost"
)


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    x: float  # centre, fraction of the image width from the left
    y: float  # centre, fraction of the image height from the top
    size: float  # width and height, fraction of the image
    nearness: float = 0.0  # inverse depth in (0, 1]; later-drawn objects are nearer

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the image."""
        half = self.size / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)


@dataclass(frozen=True)
class Sign:
    word: str
    x: float  # top-left corner of the text, fractions of the image
    y: float


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[ShapeObject, ...]  # drawn in this order (later = in front)
    sign: Sign | None = None


class ShapesWorld:
    # what the segmentation and detection stand-ins learn to name (the world's `truth` indexes them)
    seg_classes: ClassVar[tuple[str, ...]] = SEG_CLASSES
    detection_classes: ClassVar[tuple[str, ...]] = DETECTION_CLASSES

    def __init__(self, seed: int = 0, image_size: int = 64):
        self.seed = seed
        self.image_size = image_size

    def _rng(self, split: str, index: int, purpose: str) -> np.random.Generator:
        """An independent stream per (seed, split, index, purpose), identical in every process."""
        digest = hashlib.sha256(f"shapes/{self.seed}/{split}/{index}/{purpose}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))

    def scene(self, split: str, index: int) -> Scene:
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        rng = self._rng(split, index, "scene")
        count = int(rng.integers(1, MAX_OBJECTS + 1))
        colors = [COLORS[i] for i in rng.choice(len(COLORS), size=count, replace=False)]
        shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=count)]
        while True:  # a layout that cannot fit its last object starts over, still from `rng`
            placed: list[ShapeObject] = []
            for color, shape in zip(colors, shapes):
                for _ in range(PLACEMENT_TRIES):
                    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
                    candidate = ShapeObject(
                        color,
                        shape,
                        x=float(rng.uniform(size / 2, 1 - size / 2)),
                        y=float(rng.uniform(size / 2, 1 - size / 2)),
                        size=size,
                    )
                    if fits(candidate, placed):
                        placed.append(candidate)
                        break
                else:
                    break
            if len(placed) == count:
                break
        # Depth and sign come from streams of their own, so adding them changed no earlier scene.
        depth_rng = self._rng(split, index, "depth")
        nearness = np.sort(depth_rng.uniform(FARTHEST, NEAREST, size=count))
        nearness[-1] = NEAREST
        objects = tuple(replace(obj, nearness=float(n)) for obj, n in zip(placed, nearness))
        return Scene(split, index, objects, self._sign(split, index, objects))

    def _font(self) -> ImageFont.FreeTypeFont:
        return ImageFont.load_default(size=max(6, round(SIGN_FONT_FRACTION * self.image_size)))

    def _sign(self, split: str, index: int, objects: tuple[ShapeObject, ...]) -> Sign | None:
        """A word on half the scenes, where it touches no object (or no word if none fits)."""
        rng = self._rng(split, index, "sign")
        if rng.random() < 0.5:
            return None
        word = SIGN_WORDS[int(rng.integers(len(SIGN_WORDS)))]
        n = self.image_size
        left, top, right, bottom = (v / n for v in self._font().getbbox(word))
        for _ in range(PLACEMENT_TRIES):
            x, y = float(rng.uniform(0.02 - left, 0.98 - right)), float(rng.uniform(0.02 - top, 0.98 - bottom))
            ink = (x + left - SIGN_MARGIN, y + top - SIGN_MARGIN, x + right + SIGN_MARGIN, y + bottom + SIGN_MARGIN)
            if all(ink[2] < o.box[0] or o.box[2] < ink[0] or ink[3] < o.box[1] or o.box[3] < ink[1] for o in objects):
                return Sign(word, x, y)
        return None

    def sign_box(self, sign: Sign) -> tuple[float, float, float, float]:
        """The printed word's ink box, (x0, y0, x1, y1) as fractions of the image."""
        n = self.image_size
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (n, n))).textbbox((sign.x * n, sign.y * n), sign.word, font=self._font())
        return (left / n, top / n, right / n, bottom / n)

    def render(self, scene: Scene) -> Image.Image:
        """Aliased polygons on a noisy light-grey canvas: exact, so pixels hash identically."""
        n = self.image_size
        noise = self._rng(scene.split, scene.index, "pixels").integers(
            -BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(n, n, 1)
        )
        canvas = np.repeat(BACKGROUND_GREY + noise, 3, axis=2).astype(np.uint8)
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for obj in scene.objects:
            draw_shape(draw, obj, n, PAINT[obj.color])
        if scene.sign is not None:
            draw.text((scene.sign.x * n, scene.sign.y * n), scene.sign.word, font=self._font(), fill=SIGN_PAINT)
        return image

    def truth(self, scene: Scene, resolution: int) -> dict[str, np.ndarray]:
        """What every pixel is, at `resolution` x `resolution` over the whole image.

        inverse_depth float32 (background 0, objects their nearness), classes uint8 (SEG_CLASSES
        index), instances uint8 (index into scene.objects, 255 background), edges bool (where the
        instance changes between 4-neighbours), boxes float32 [k, 4] and box_classes int64 [k]
        (DETECTION_CLASSES index) in scene order, words: the printed word(s) and their ink boxes.
        """
        instances_image = Image.new("L", (resolution, resolution), BACKGROUND_INSTANCE)
        draw = ImageDraw.Draw(instances_image)
        for i, obj in enumerate(scene.objects):
            draw_shape(draw, obj, resolution, i)
        instances = np.asarray(instances_image, dtype=np.uint8)
        objects = scene.objects
        nearness = np.array([0.0] * 256, dtype=np.float32)
        classes = np.zeros(256, dtype=np.uint8)
        for i, obj in enumerate(objects):
            nearness[i] = obj.nearness
            classes[i] = SEG_CLASSES.index(obj.shape)
        edges = instance_edges(instances)
        return {
            "inverse_depth": nearness[instances],
            "classes": classes[instances],
            "instances": instances,
            "edges": edges,
            "boxes": np.array([o.box for o in objects], dtype=np.float32).reshape(-1, 4),
            "box_classes": np.array([DETECTION_CLASSES.index(name(o)) for o in objects], dtype=np.int64),
            "words": [scene.sign.word] if scene.sign else [],
            "word_boxes": np.array([self.sign_box(scene.sign)] if scene.sign else [], dtype=np.float32).reshape(-1, 4),
        }

    def captions(self, scene: Scene) -> list[str]:
        """Five captions: different orders, viewpoints (sides, relations, counts), same facts."""
        objects = scene.objects
        by_x = sorted(objects, key=lambda o: o.x)
        count = len(objects)
        shapes_word = "shape" if count == 1 else "shapes"
        first = f"{enumerate_phrases([noun_phrase(o) for o in objects])} on a gray background"
        sides = f"{COUNT_WORDS[count]} {shapes_word}, " + enumerate_phrases(
            [f"{noun_phrase(o)} on the {side(o)}" for o in by_x]
        )
        if count == 1:
            order = f"a single {name(objects[0])}"
            relation = f"the {name(objects[0])} is on the {side(objects[0])} side of the image"
        else:
            order = f"from left to right, {enumerate_phrases([noun_phrase(o) for o in by_x])}"
            relation = f"the {name(by_x[0])} is left of the {name(by_x[1])}"
            if count == 3:
                relation += f", which is left of the {name(by_x[2])}"
        shape_counts = [
            f"{COUNT_WORDS[n]} {shape if n == 1 else shape + 's'}"
            for shape in SHAPES
            if (n := sum(o.shape == shape for o in objects))
        ]
        verb = "is" if shape_counts[0].startswith("one ") else "are"  # agrees with what follows
        tally = f"there {verb} {enumerate_phrases(shape_counts)}"
        return [first, sides, order, relation, tally]

    def questions(self, scene: Scene) -> list[dict]:
        """One question of each kind: existence, colour, shape, count, position."""
        rng = self._rng(scene.split, scene.index, "questions")
        objects = scene.objects
        asked = [
            self._existence_question(objects, rng),
            self._color_question(objects, rng),
            self._shape_question(objects, rng),
            ("how many shapes are there?", str(len(objects)), "number"),
            self._position_question(objects, rng),
        ]
        return [
            {"question": q, "answers": [a] * ANSWERS_PER_QUESTION, "answer_type": t}
            for q, a, t in asked
        ]

    @staticmethod
    def _existence_question(objects, rng) -> tuple[str, str, str]:
        """Yes half the time; a no names a combination that is absent, often a near miss."""
        if rng.random() < 0.5:
            obj = objects[int(rng.integers(len(objects)))]
            color, shape, answer = obj.color, obj.shape, "yes"
        else:
            present = {(o.color, o.shape) for o in objects}
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[int(rng.integers(len(absent)))]
            answer = "no"
        return f"is there {article(color)} {color} {shape}?", answer, "yes/no"

    @staticmethod
    def _color_question(objects, rng) -> tuple[str, str, str]:
        """Asked about an object named without its colour: a unique shape, or an extreme side."""
        by_x = sorted(objects, key=lambda o: o.x)
        candidates = [
            (f"what color is the {o.shape}?", o.color)
            for o in objects
            if sum(p.shape == o.shape for p in objects) == 1
        ]
        if len(objects) > 1:
            candidates.append(("what color is the leftmost shape?", by_x[0].color))
            candidates.append(("what color is the rightmost shape?", by_x[-1].color))
        question, answer = candidates[int(rng.integers(len(candidates)))]
        return question, answer, "other"

    @staticmethod
    def _shape_question(objects, rng) -> tuple[str, str, str]:
        obj = objects[int(rng.integers(len(objects)))]
        return f"what shape is the {obj.color} object?", obj.shape, "other"

    @staticmethod
    def _position_question(objects, rng) -> tuple[str, str, str]:
        """Relative ("is A left of B?", yes half the time) or absolute ("where is A?")."""
        if len(objects) > 1 and rng.random() < 0.5:
            i, j = rng.choice(len(objects), size=2, replace=False)
            a, b = objects[int(i)], objects[int(j)]
            answer = "yes" if a.x < b.x else "no"
            return f"is the {name(a)} left of the {name(b)}?", answer, "yes/no"
        obj = objects[int(rng.integers(len(objects)))]
        return f"where is the {name(obj)}?", side(obj), "other"

    def fusion(self, scene: Scene) -> dict:
        """The sentence and class of the two-modality task: index = (count - 1) * 3 + material."""
        rng = self._rng(scene.split, scene.index, "fusion")
        material = int(rng.integers(len(MATERIALS)))
        template = MATERIAL_TEMPLATES[int(rng.integers(len(MATERIAL_TEMPLATES)))]
        return {
            "text": template.format(material=MATERIALS[material]),
            "label": (len(scene.objects) - 1) * len(MATERIALS) + material,
        }

    def labels(self, scene: Scene) -> dict:
        """Dense targets for pretraining a tiny image encoder on this world.

        presence: 18 multi-hot, index = colour_index * 3 + shape_index (colour-major).
        count: number of objects (1-3).
        left_right: per colour in COLORS order, 0 = absent, 1 = left half, 2 = right half.
        """
        presence = [0] * (len(COLORS) * len(SHAPES))
        left_right = [0] * len(COLORS)
        for obj in scene.objects:
            c = COLORS.index(obj.color)
            presence[c * len(SHAPES) + SHAPES.index(obj.shape)] = 1
            left_right[c] = 1 + SIDES.index(side(obj))
        return {"presence": presence, "count": len(scene.objects), "left_right": left_right}

    def vocabulary(self) -> list[str]:
        """Every word the captions, questions and answers can contain, sorted."""
        words = set(TEMPLATE_WORDS.split())
        words.update(COLORS, SHAPES, (s + "s" for s in SHAPES), COUNT_WORDS.values(), SIDES, YES_NO)
        words.update(str(n) for n in COUNT_WORDS)
        return sorted(words)


def draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, n: int, fill: tuple[int, int, int] | int) -> None:
    """One object on an n x n canvas: the same geometry for the picture and for its truth maps."""
    cx, cy, r = obj.x * n, obj.y * n, obj.size * n / 2
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def instance_edges(instances: np.ndarray) -> np.ndarray:
    """Where the instance map changes between 4-neighbours (both sides of each boundary)."""
    edges = np.zeros_like(instances, dtype=bool)
    edges[:, 1:] |= instances[:, 1:] != instances[:, :-1]
    edges[:, :-1] |= instances[:, 1:] != instances[:, :-1]
    edges[1:] |= instances[1:] != instances[:-1]
    edges[:-1] |= instances[1:] != instances[:-1]
    return edges


def paint_per_patch(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """How many pixels of each colour (COLORS order) each patch of a rendered image holds:
    int [colours, patches], patches row-major. Read off the pixels, so it is exact at every edge:
    each colour is painted in exactly one RGB value, which the background noise never reaches."""
    height, width = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    painted = np.stack([(pixels.astype(np.int16) == PAINT[color]).all(axis=-1) for color in COLORS])
    per_patch = painted.reshape(len(COLORS), height, patch_size, width, patch_size).sum(axis=(2, 4))
    return per_patch.reshape(len(COLORS), height * width)


def fits(candidate: ShapeObject, placed: list[ShapeObject]) -> bool:
    """Clear of the midline, horizontally apart from and barely overlapping what is placed."""
    if abs(candidate.x - 0.5) < MIDLINE_CLEARANCE:
        return False
    for other in placed:
        if abs(candidate.x - other.x) < MIN_HORIZONTAL_GAP:
            return False
        # Circles of 0.6 x size around each centre stay disjoint; a square's corners reach 0.71,
        # so at most the tips of two shapes meet.
        distance = np.hypot(candidate.x - other.x, candidate.y - other.y)
        if distance < 0.6 * (candidate.size + other.size):
            return False
    return True


def side(obj: ShapeObject) -> str:
    return "left" if obj.x < 0.5 else "right"


def name(obj: ShapeObject) -> str:
    return f"{obj.color} {obj.shape}"


def noun_phrase(obj: ShapeObject) -> str:
    return f"{article(obj.color)} {name(obj)}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def enumerate_phrases(phrases: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


DEFAULT_SCENES = {"train": 2000, "val": 200, "test": 200}
MAX_SCENES = 1_000_000  # keys carry six digits, so key order is index order


class ShapesSource(Source):
    name: ClassVar[str] = "shapes"
    description: ClassVar[str] = (
        "synthetic coloured shapes with captions, VQA questions, labels and a 9-class "
        "image+text task; no data root "
        "(options: num, seed, image_size)"
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
        **options,
    ):
        super().__init__(data_root, split, **options)
        self.num = DEFAULT_SCENES[split] if num is None else as_int("num", num, 1, MAX_SCENES)
        self.world = ShapesWorld(
            seed=as_int("seed", seed, 0, 2**63 - 1),
            image_size=as_int("image_size", image_size, 8, 4096),
        )

    def samples(self) -> list[Sample]:
        samples = []
        for index in range(self.num):
            scene = self.world.scene(self.split, index)
            samples.append(
                Sample(
                    key=f"shapes-{self.split}-{index:06d}",
                    media=f"{self.split}/{index}",
                    annotations={
                        "captions": self.world.captions(scene),
                        "questions": self.world.questions(scene),
                        "labels": self.world.labels(scene),
                        "sign": [scene.sign.word] if scene.sign else [],
                        **self.world.fusion(scene),
                    },
                )
            )
        return samples

    def load_image(self, sample: Sample) -> Image.Image:
        split, _, index = sample.media.partition("/")
        if split not in self.splits or not index.isdigit():
            raise MediaError(f"not a shapes locator (expected 'SPLIT/INDEX'): {sample.media!r}")
        return self.world.render(self.world.scene(split, int(index)))

    def info(self) -> dict:
        return {
            **super().info(),
            "num": self.num,
            "seed": self.world.seed,
            "image_size": self.world.image_size,
            "classes": list(FUSION_CLASSES),
            "multi_label": False,
        }


def as_int(option: str, value: int | str, low: int, high: int) -> int:
    """An option that may arrive as text from the command line, checked against its range."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SourceError(f"shapes: option {option} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise SourceError(f"shapes: option {option} must be in {low}..{high}, got {number}")
    return number
