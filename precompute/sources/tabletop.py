"""`tabletop`: shapes standing on a tiled floor, seen in perspective, where each of Prismer's
experts knows something a backbone trained on captions does not make explicit.

`shapes` (the first embedded world) cannot test Prismer's claim: every label there is a function
of the flat 64-px picture, nearness is a random number no pixel shows, and the stand-in ViT was
pretrained on exactly what the questions ask. Here each expert has a question type of its own:

- **depth**: objects stand on a floor that recedes to a horizon, so nearness is visible (lower in
  the picture, larger, and drawn far to near, so nearer objects really hide farther ones) but
  never named in a caption. "is the red circle nearer than the blue square?" (yes half the time).
- **form** (normals): every object is flat (one shade) or round (a sphere, a vertical cylinder or a
  cone, shaded by a light from the upper left). "is the red circle flat or round?" (half each).
- **count** (segmentation, detection): objects of one colour stand side by side, touching, so
  their silhouettes merge; only each instance's own outline and shading separate them. "how many
  red shapes are there?" (1, 2 or 3, drawn uniformly before the scene is built).
- **sign** (OCR): a board on the wall carries one of 40 words. "what word is on the sign?"
- **color** and **side** are controls the captions do teach ("what color is the leftmost shape?",
  "is the red circle on the left or the right?"): experts should not help there.

Each question's `answer_type` is its question type (so the trainer's `vqa_accuracy/<type>`
breaks accuracy down by what is asked), and each sample's `quantities` hold, per type, a scene-level
class index of the quantity that type needs, for linear probes (`info()["quantities"]` names the
classes). Captions name colours, outline shapes, sides and how many shapes there are in all, and
never depth, form, the sign's word or how many of one colour: they are what a CLIP-like
backbone is pretrained on. Like `shapes`, everything is a pure function of (seed, split, index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from precompute.decode import MediaError
from precompute.sources.base import Sample, Source
from precompute.sources.shapes import (
    ANSWERS_PER_QUESTION,
    COLORS,
    DEFAULT_SCENES,
    MATERIAL_TEMPLATES,
    MATERIALS,
    MAX_SCENES,
    PAINT,
    SHAPES,
    Sign,
    as_int,
    enumerate_phrases,
    instance_edges,
)

FORMS = ("flat", "round")
HORIZON = 0.36  # the floor meets the wall this far down the picture
FLOOR_SCALE = 0.62  # a floor point at depth z is drawn at y = HORIZON + FLOOR_SCALE / z
NEAREST_Z, FARTHEST_Z = 1.0, 2.4  # object depths (camera height units)
MIN_DEPTH_GAP = 0.3  # between colour groups: "nearer" is never a judgement call
OBJECT_SCALE = 0.3  # an object of real size 1 at depth z is OBJECT_SCALE / z of the picture wide
MIN_REAL_SIZE, MAX_REAL_SIZE = 0.85, 1.15  # real sizes vary, so apparent size alone is not depth
MIN_VISIBLE = 0.6  # every object keeps this share of its pixels in front of the others
MIDLINE_CLEARANCE = 0.06
EXTREME_GAP = 0.05  # the leftmost (rightmost) centre is this much clear of the next one
PLACEMENT_TRIES = 200
LIGHT = np.array([-0.5, -0.6, 0.62]) / np.linalg.norm([-0.5, -0.6, 0.62])  # x right, y down, z to the viewer
AMBIENT, DIFFUSE = 0.35, 0.75
OUTLINE_SHADE = 0.55  # each object's own 1-px rim: what separates touching twins
WALL, FLOOR_LIGHT, FLOOR_DARK, BOARD, INK = (196, 204, 218), 178, 150, 246, 25
FLOOR_TILE = 0.5  # floor tile side, camera-height units
NOISE = 4
SIGN_FONT_FRACTION = 0.19

# Short words the OCR expert must read: 40 of them, so a guess is right 2.5% of the time.
SIGN_WORDS = (
    "stop", "open", "exit", "sale", "taxi", "hotel", "cafe", "park", "bank", "zoo",
    "bus", "gym", "spa", "bar", "inn", "shop", "deli", "fish", "bike", "golf",
    "pool", "pier", "mall", "farm", "wine", "cake", "book", "art", "toys", "pet",
    "bread", "lake", "fuel", "tea", "jazz", "mint", "rent", "dock", "lift", "wash",
)
# How many instances of each colour a scene has (a partition of the object count), by the count
# the count question asks: that answer is drawn first, uniformly, then one pattern holding it.
PATTERNS = {
    1: ((1, 1), (1, 1, 1), (2, 1), (1, 1, 1, 1), (2, 1, 1), (3, 1)),
    2: ((2, 1), (2, 2), (2, 1, 1)),
    3: ((3, 1),),
}
QUESTION_TYPES = ("depth", "form", "count", "sign", "color", "side")
EXPERT_QUESTION_TYPES = ("depth", "form", "count", "sign")
CONTROL_QUESTION_TYPES = ("color", "side")
SEG_CLASSES = ("wall", "floor", "sign", *SHAPES)
DETECTION_CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
BACKGROUND_INSTANCE = 255
FUSION_CLASSES = tuple(f"{color} {material}" for color in COLORS for material in MATERIALS)
# MoPE's conditional task (`tabletop-instruct`): the sentence is a yes/no instruction about the scene
INSTRUCTION_CLASSES = ("no", "yes")
INSTRUCTIONS = {
    "present": "is there a {value} shape?",
    "leftmost": "is the leftmost shape {value}?",
    "rightmost": "is the rightmost shape {value}?",
    "leftmost_shape": "is the leftmost shape a {value}?",
}
TEMPLATE_WORDS = (
    "a an and on the in of is which there are what color shape shapes how many word sign "
    "nearer than flat or round left right leftmost rightmost side all floor wall tiled front with "
    "outlines include two three four"
)


@dataclass(frozen=True)
class TabletopObject:
    color: str
    shape: str
    form: str
    x: float  # centre, fraction of the image width
    z: float  # depth, camera-height units (NEAREST_Z nearest)
    real_size: float

    @property
    def size(self) -> float:
        return OBJECT_SCALE * self.real_size / self.z

    @property
    def base(self) -> float:
        """Where it touches the floor, fraction of the image height."""
        return HORIZON + FLOOR_SCALE / self.z

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the whole object (hidden parts included), fractions of the image."""
        return (self.x - self.size / 2, self.base - self.size, self.x + self.size / 2, self.base)


@dataclass(frozen=True)
class TabletopScene:
    split: str
    index: int
    objects: tuple[TabletopObject, ...]  # far to near: the drawing order
    asked_color: str  # the colour the count question asks about
    word: str
    sign_x: float  # left edge of the board, fraction of the image width

    @property
    def sign(self) -> Sign:
        """The printed word as `shapes` scenes carry it (every tabletop scene has one)."""
        return Sign(self.word, self.sign_x, 0.0)


def name(obj: TabletopObject) -> str:
    return f"{obj.color} {obj.shape}"


def side(obj: TabletopObject) -> str:
    return "left" if obj.x < 0.5 else "right"


class TabletopWorld:
    seg_classes: ClassVar[tuple[str, ...]] = SEG_CLASSES
    detection_classes: ClassVar[tuple[str, ...]] = DETECTION_CLASSES

    def __init__(self, seed: int = 0, image_size: int = 64):
        self.seed = seed
        self.image_size = image_size

    def _rng(self, split: str, index: int, purpose: str) -> np.random.Generator:
        digest = hashlib.sha256(f"tabletop/{self.seed}/{split}/{index}/{purpose}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))

    def scene(self, split: str, index: int) -> TabletopScene:
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        rng = self._rng(split, index, "scene")
        asked_count = int(rng.integers(1, 4))
        options = PATTERNS[asked_count]
        pattern = options[int(rng.integers(len(options)))]
        colors = [COLORS[i] for i in rng.choice(len(COLORS), size=len(pattern), replace=False)]
        asked = [c for c, k in zip(colors, pattern) if k == asked_count]
        asked_color = asked[int(rng.integers(len(asked)))]
        word = SIGN_WORDS[int(rng.integers(len(SIGN_WORDS)))]
        for _ in range(PLACEMENT_TRIES):
            objects = self._layout(rng, colors, pattern)
            if objects is not None:
                break
        else:  # pragma: no cover - the constants leave ample room; a failure here is a bug
            raise RuntimeError(f"tabletop: no layout for {split}/{index} after {PLACEMENT_TRIES} tries")
        board_width = self.board_box(word, 0.0)[2]
        sign_x = float(rng.uniform(0.03, 0.97 - board_width))
        return TabletopScene(split, index, objects, asked_color, word, sign_x)

    def _layout(self, rng: np.random.Generator, colors: list[str], pattern: tuple[int, ...]):
        """Each colour group at a depth of its own (MIN_DEPTH_GAP apart), its members side by side,
        touching; None if the draw breaks a rule (too hidden, extremes or sides unclear)."""
        slack = FARTHEST_Z - NEAREST_Z - (len(pattern) - 1) * MIN_DEPTH_GAP  # uniform, at least the gap apart
        depths = NEAREST_Z + np.sort(rng.uniform(0, slack, size=len(pattern))) + MIN_DEPTH_GAP * np.arange(len(pattern))
        depths = rng.permutation(depths)
        objects = []
        for color, count, z in zip(colors, pattern, depths):
            shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=count, replace=False)]
            sizes = rng.uniform(MIN_REAL_SIZE, MAX_REAL_SIZE, size=count)
            widths = OBJECT_SCALE * sizes / z
            total = widths.sum() * 0.92  # neighbours overlap by 4% of their widths: they touch
            start = float(rng.uniform(0.02, 0.98 - total))
            left = start
            for shape, real_size, width in zip(shapes, sizes, widths):
                form = FORMS[int(rng.integers(2))]
                objects.append(TabletopObject(color, shape, form, left + width / 2, float(z), float(real_size)))
                left += width * 0.92
        objects.sort(key=lambda o: -o.z)  # far to near
        xs = sorted(o.x for o in objects)
        if xs[1] - xs[0] < EXTREME_GAP or xs[-1] - xs[-2] < EXTREME_GAP:
            return None
        if not any(abs(o.x - 0.5) >= MIDLINE_CLEARANCE for o in objects):
            return None
        masks = [self._mask(o, 64) for o in objects]
        for i, mask in enumerate(masks):
            hidden = np.zeros_like(mask)
            for nearer in masks[i + 1 :]:
                hidden |= nearer
            if (mask & ~hidden).sum() < MIN_VISIBLE * mask.sum():
                return None
        return tuple(objects)

    # --- pixels ----------------------------------------------------------------------------------

    @staticmethod
    def _mask(obj: TabletopObject, n: int) -> np.ndarray:
        image = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = (v * n for v in obj.box)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=1)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=1)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
        return np.asarray(image, dtype=bool)

    @staticmethod
    def _normals(obj: TabletopObject, n: int) -> np.ndarray:
        """[n, n, 3] unit normals (x right, y down, z to the viewer) of the object's surface,
        defined over its whole box: flat faces the viewer; a round circle is a sphere, a round
        square a vertical cylinder, a round triangle a cone."""
        x0, y0, x1, y1 = (v * n for v in obj.box)
        cols = (np.arange(n) + 0.5)[None, :].repeat(n, 0)
        rows = (np.arange(n) + 0.5)[:, None].repeat(n, 1)
        normals = np.zeros((n, n, 3))
        normals[..., 2] = 1.0
        if obj.form == "flat":
            return normals
        u = (cols - (x0 + x1) / 2) / max((x1 - x0) / 2, 1e-6)  # -1..1 across
        v = (rows - (y0 + y1) / 2) / max((y1 - y0) / 2, 1e-6)  # -1..1 down
        if obj.shape == "circle":
            nx, ny = u, v
        elif obj.shape == "square":
            nx, ny = u, np.zeros_like(v)
        else:  # a cone: the half-width grows from the apex (v = -1) to the base (v = 1)
            half = np.clip((v + 1) / 2, 1e-3, None)
            nx, ny = np.clip(u / half, -1, 1) * 0.9, np.full_like(v, -0.3)
        nx, ny = np.clip(nx, -0.98, 0.98), np.clip(ny, -0.98, 0.98)
        nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0.04, None))
        normals = np.stack([nx, ny, nz], axis=-1)
        return normals / np.linalg.norm(normals, axis=-1, keepdims=True)

    def _font(self, n: int) -> ImageFont.FreeTypeFont:
        return ImageFont.load_default(size=max(6, round(SIGN_FONT_FRACTION * n)))

    def board_box(self, word: str, x: float, n: int | None = None) -> tuple[float, float, float, float]:
        """The sign's board, (x0, y0, x1, y1) as fractions: the word's ink with a margin."""
        n = n or self.image_size
        left, top, right, bottom = self._font(n).getbbox(word)
        margin = 0.04
        width, height = (right - left) / n + 2 * margin, (bottom - top) / n + 2 * margin
        y0 = (HORIZON - height) / 2
        return (x, y0, x + width, y0 + height)

    def _layers(self, scene: TabletopScene, n: int) -> dict[str, np.ndarray]:
        """Every per-pixel truth at n x n: instance, inverse depth (round objects bulge toward the
        viewer, so depth alone tells flat from round, as it does in the world), normals, class."""
        rows = (np.arange(n) + 0.5) / n
        floor = rows > HORIZON
        inverse_depth_rows = np.where(floor, (rows - HORIZON) / FLOOR_SCALE, 0.0)
        inverse_depth = np.repeat(inverse_depth_rows[:, None], n, axis=1)
        normals = np.zeros((n, n, 3))
        normals[..., 2] = 1.0
        normals[floor] = (0.0, -1.0, 0.0)  # the floor faces up (y runs down the image)
        classes = np.where(floor[:, None], SEG_CLASSES.index("floor"), SEG_CLASSES.index("wall")).repeat(n, 1)
        bx0, by0, bx1, by1 = (round(v * n) for v in self.board_box(scene.word, scene.sign_x, n))
        classes[by0:by1, bx0:bx1] = SEG_CLASSES.index("sign")
        instances = np.full((n, n), BACKGROUND_INSTANCE, dtype=np.uint8)
        for i, obj in enumerate(scene.objects):  # far to near: nearer pixels overwrite
            mask = self._mask(obj, n)
            instances[mask] = i
            surface = self._normals(obj, n)
            # a round object's surface comes toward the viewer by up to its radius (in world units)
            relief = 0.0 if obj.form == "flat" else obj.size * obj.z / FLOOR_SCALE / 2 * surface[mask][:, 2]
            inverse_depth[mask] = 1.0 / (obj.z - relief)
            normals[mask] = surface[mask]
            classes[mask] = SEG_CLASSES.index(obj.shape)
        return {"instances": instances, "inverse_depth": inverse_depth.astype(np.float32),
                "normals": normals.astype(np.float32), "classes": classes.astype(np.uint8)}

    def render(self, scene: TabletopScene) -> Image.Image:
        n = self.image_size
        layers = self._layers(scene, n)
        rows = (np.arange(n) + 0.5) / n
        cols = (np.arange(n) + 0.5) / n
        z = FLOOR_SCALE / np.clip(rows - HORIZON, 1e-3, None)
        lateral = (cols[None, :] - 0.5) * z[:, None] / FLOOR_SCALE
        tiles = (np.floor(lateral / FLOOR_TILE) + np.floor(z[:, None] / FLOOR_TILE)) % 2
        floor_grey = np.where(tiles == 0, FLOOR_LIGHT, FLOOR_DARK)
        canvas = np.empty((n, n, 3))
        canvas[:] = WALL
        canvas[rows > HORIZON] = floor_grey[rows > HORIZON, :, None]
        noise = self._rng(scene.split, scene.index, "pixels").integers(-NOISE, NOISE + 1, size=(n, n, 1))
        canvas += noise
        instances = layers["instances"]
        shade = AMBIENT + DIFFUSE * np.clip(layers["normals"] @ LIGHT, 0, None)
        for i, obj in enumerate(scene.objects):
            mine = instances == i
            rim = mine & ~_interior(mine)
            color = np.array(PAINT[obj.color], dtype=float)
            canvas[mine] = color * shade[mine, None]
            canvas[rim] = color * OUTLINE_SHADE
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = (v * n for v in self.board_box(scene.word, scene.sign_x, n))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(BOARD,) * 3)  # no frame: OCR reads a frame as "l" or "]"
        left, top, _, _ = self._font(n).getbbox(scene.word)
        draw.text((x0 + 0.04 * n - left, y0 + 0.04 * n - top), scene.word, font=self._font(n), fill=(INK,) * 3)
        return image

    def truth(self, scene: TabletopScene, resolution: int) -> dict[str, np.ndarray]:
        """What every pixel is at `resolution`: as `ShapesWorld.truth` (inverse_depth, classes
        over SEG_CLASSES, instances, edges, visible boxes, box_classes over DETECTION_CLASSES,
        words, word_boxes) plus normals [R, R, 3] (x right, y down, z to the viewer)."""
        layers = self._layers(scene, resolution)
        instances = layers["instances"]
        edges = instance_edges(instances)
        boxes, box_classes = [], []
        for i, obj in enumerate(scene.objects):
            ys, xs = np.nonzero(instances == i)
            boxes.append((xs.min() / resolution, ys.min() / resolution, (xs.max() + 1) / resolution,
                          (ys.max() + 1) / resolution))
            box_classes.append(DETECTION_CLASSES.index(name(obj)))
        n = resolution
        x0, y0, x1, y1 = self.board_box(scene.word, scene.sign_x, n)
        left, top, right, bottom = self._font(n).getbbox(scene.word)
        ink = (x0 + 0.04, y0 + 0.04, x0 + 0.04 + (right - left) / n, y0 + 0.04 + (bottom - top) / n)
        return {
            **layers,
            "edges": edges,
            "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "box_classes": np.array(box_classes, dtype=np.int64),
            "words": [scene.word],
            "word_boxes": np.array([ink], dtype=np.float32),
        }

    # --- text ------------------------------------------------------------------------------------

    def captions(self, scene: TabletopScene) -> list[str]:
        """Five captions naming colours, outline shapes, sides and the total count, nothing else."""
        objects = scene.objects
        count = {2: "two", 3: "three", 4: "four"}[len(objects)]
        colors = [c for c in COLORS if any(o.color == c for o in objects)]
        shapes = [s + "s" for s in SHAPES if any(o.shape == s for o in objects)]
        by_x = sorted(objects, key=lambda o: o.x)
        sides = []
        for color in colors:
            where = {side(o) for o in objects if o.color == color}
            sides.append(f"{color} on the {where.pop()}" if len(where) == 1 else f"{color} on the left and right")
        return [
            f"{count} shapes on a tiled floor in front of a wall with a sign",
            f"{enumerate_phrases(colors)} shapes on the floor",
            f"the shapes include {enumerate_phrases(shapes)}",
            enumerate_phrases(sides),
            f"{count} shapes in all, the leftmost {by_x[0].color} and the rightmost {by_x[-1].color}",
        ]

    def questions(self, scene: TabletopScene) -> list[dict]:
        """One question of each type in QUESTION_TYPES; `answer_type` is the type."""
        rng = self._rng(scene.split, scene.index, "questions")
        objects = scene.objects
        pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
        # depth: two objects of different colours (groups stand MIN_DEPTH_GAP apart)
        a = pick(objects)
        b = pick([o for o in objects if o.color != a.color])
        if rng.random() < 0.5:
            a, b = b, a
        depth = (f"is the {name(a)} nearer than the {name(b)}?", "yes" if a.z < b.z else "no")
        shown = pick(objects)
        form = (f"is the {name(shown)} flat or round?", shown.form)
        count = (f"how many {scene.asked_color} shapes are there?",
                 str(sum(o.color == scene.asked_color for o in objects)))
        sign = ("what word is on the sign?", scene.word)
        by_x = sorted(objects, key=lambda o: o.x)
        extreme = pick(["leftmost", "rightmost"])
        color = (f"what color is the {extreme} shape?", (by_x[0] if extreme == "leftmost" else by_x[-1]).color)
        placed = pick([o for o in objects if abs(o.x - 0.5) >= MIDLINE_CLEARANCE])
        where = (f"is the {name(placed)} on the left or the right?", side(placed))
        asked = dict(zip(QUESTION_TYPES, (depth, form, count, sign, color, where)))
        return [
            {"question": q, "answers": [answer] * ANSWERS_PER_QUESTION, "answer_type": kind}
            for kind, (q, answer) in asked.items()
        ]

    def quantities(self, scene: TabletopScene) -> dict[str, int]:
        """Per question type, a scene-level class index of what that type needs (for probes):
        depth the nearest object's colour, form the nearest object's form, count how many of the
        asked colour (0-based), sign the word, color the leftmost colour, side the side of the
        nearest object."""
        nearest = scene.objects[-1]
        leftmost = min(scene.objects, key=lambda o: o.x)
        return {
            "depth": COLORS.index(nearest.color),
            "form": FORMS.index(nearest.form),
            "count": sum(o.color == scene.asked_color for o in scene.objects) - 1,
            "sign": SIGN_WORDS.index(scene.word),
            "color": COLORS.index(leftmost.color),
            "side": ("left", "right").index(side(nearest)),
        }

    def labels(self, scene: TabletopScene) -> dict:
        """What the captions say, as targets for pretraining a backbone on them: colours present
        (6 multi-hot), outline shapes present (3 multi-hot), how many shapes in all, and per colour
        where it is (0 absent, 1 left, 2 right, 3 both)."""
        colors = [0] * len(COLORS)
        shapes = [0] * len(SHAPES)
        sides = [0] * len(COLORS)
        for obj in scene.objects:
            c = COLORS.index(obj.color)
            colors[c] = 1
            shapes[SHAPES.index(obj.shape)] = 1
            sides[c] |= 1 if side(obj) == "left" else 2
        return {"colors": colors, "shapes": shapes, "count": len(scene.objects), "color_sides": sides}

    def fusion(self, scene: TabletopScene) -> dict:
        """MoPE's two-modality class: (the leftmost shape's colour, the material the sentence names),
        18 classes. The picture shows the colour (uniform over six), only the sentence names the
        material (uniform over three, independent of the scene): either alone is right a sixth or a
        third of the time. (Object counts are not uniform here, so unlike `shapes` the class does not
        use them.)"""
        rng = self._rng(scene.split, scene.index, "fusion")
        material = int(rng.integers(len(MATERIALS)))
        template = MATERIAL_TEMPLATES[int(rng.integers(len(MATERIAL_TEMPLATES)))]
        leftmost = min(scene.objects, key=lambda o: o.x)
        return {"text": template.format(material=MATERIALS[material]),
                "label": COLORS.index(leftmost.color) * len(MATERIALS) + material}

    def instruction(self, scene: TabletopScene) -> dict:
        """MoPE's conditional task: a yes/no instruction over the scene, whose answer depends on
        both. The type (INSTRUCTIONS: is a colour present, the leftmost / rightmost shape's colour,
        the leftmost shape's outline) and the answer are drawn uniformly and independently, then the
        value that makes the answer true or false: "no" names an absent colour for `present` and
        another PRESENT colour (or another outline) for the extremes, so presence alone does not
        answer them. Every type can take both answers in every scene (two to four colour groups of
        six colours, three outlines), so the text alone is at chance (each sentence is as often yes
        as no), and the image alone too (the same scene gets either answer): only reading the image
        AS the sentence says answers it, which a head over [pooled image; sentence embedding]
        cannot do. Everything asked is what the captions teach the backbone (colours, outlines, the
        leftmost and rightmost colour). `instruction` is the type, for per-type accuracy."""
        rng = self._rng(scene.split, scene.index, "instruction")
        kind = tuple(INSTRUCTIONS)[int(rng.integers(len(INSTRUCTIONS)))]
        yes = bool(rng.integers(2))
        by_x = sorted(scene.objects, key=lambda o: o.x)
        present = sorted({o.color for o in scene.objects}, key=COLORS.index)
        if kind == "present":
            pool = present if yes else [c for c in COLORS if c not in present]
        elif kind in ("leftmost", "rightmost"):
            extreme = (by_x[0] if kind == "leftmost" else by_x[-1]).color
            pool = [extreme] if yes else [c for c in present if c != extreme]
        else:
            pool = [by_x[0].shape] if yes else [s for s in SHAPES if s != by_x[0].shape]
        value = pool[int(rng.integers(len(pool)))]
        return {"text": INSTRUCTIONS[kind].format(value=value), "label": int(yes), "instruction": kind}

    def vocabulary(self) -> list[str]:
        words = set(TEMPLATE_WORDS.split())
        words.update(COLORS, SHAPES, (s + "s" for s in SHAPES), FORMS, SIGN_WORDS, ("yes", "no", "1", "2", "3"))
        return sorted(words)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose four neighbours are all in it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


@cache
def _world(seed: int, image_size: int) -> TabletopWorld:
    return TabletopWorld(seed, image_size)


class TabletopSource(Source):
    name: ClassVar[str] = "tabletop"
    description: ClassVar[str] = (
        "synthetic shapes on a floor in perspective (depth, flat/round form, touching twins, a sign) with "
        "captions, typed VQA questions, probe quantities and an 18-class image+text task; no data root "
        "(options: num, seed, image_size)"
    )
    needs_data_root: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = tuple(DEFAULT_SCENES)

    def __init__(self, data_root: Path | str | None, split: str, *, num: int | str | None = None,
                 seed: int | str = 0, image_size: int | str = 64, **options):
        super().__init__(data_root, split, **options)
        self.num = DEFAULT_SCENES[split] if num is None else as_int("num", num, 1, MAX_SCENES)
        self.world = _world(as_int("seed", seed, 0, 2**63 - 1), as_int("image_size", image_size, 32, 4096))

    def samples(self) -> list[Sample]:
        samples = []
        for index in range(self.num):
            scene = self.world.scene(self.split, index)
            samples.append(Sample(
                key=f"tabletop-{self.split}-{index:06d}",
                media=f"{self.split}/{index}",
                annotations={
                    "captions": self.world.captions(scene),
                    "questions": self.world.questions(scene),
                    "labels": self.world.labels(scene),
                    "quantities": self.world.quantities(scene),
                    "sign": [scene.word],
                    **self.world.fusion(scene),
                },
            ))
        return samples

    def load_image(self, sample: Sample) -> Image.Image:
        split, _, index = sample.media.partition("/")
        if split not in self.splits or not index.isdigit():
            raise MediaError(f"not a tabletop locator (expected 'SPLIT/INDEX'): {sample.media!r}")
        return self.world.render(self.world.scene(split, int(index)))

    def info(self) -> dict:
        return {
            **super().info(),
            "num": self.num,
            "seed": self.world.seed,
            "image_size": self.world.image_size,
            "classes": list(FUSION_CLASSES),
            "multi_label": False,
            "quantities": {
                "depth": list(COLORS), "form": list(FORMS), "count": ["1", "2", "3"],
                "sign": list(SIGN_WORDS), "color": list(COLORS), "side": ["left", "right"],
            },
            "expert_question_types": list(EXPERT_QUESTION_TYPES),
            "control_question_types": list(CONTROL_QUESTION_TYPES),
        }


class TabletopInstructSource(TabletopSource):
    """The tabletop scenes with MoPE's conditional task instead of everything else: each sample's
    `text` is a yes/no instruction about its scene and `label` the answer (`TabletopWorld.instruction`),
    so the complementary modality changes how the image must be read. The images are `tabletop`'s
    (same seed, split and index: same picture); the material task stays in `tabletop` as the easy leg."""

    name: ClassVar[str] = "tabletop-instruct"
    description: ClassVar[str] = (
        "the tabletop scenes with a yes/no instruction each (is there a red shape? is the leftmost "
        "shape blue? ...): MoPE's task where the sentence changes how the image is read; balanced so "
        "text or image alone is at chance; no data root (options: num, seed, image_size)"
    )

    def samples(self) -> list[Sample]:
        return [Sample(key=f"tabletop-instruct-{self.split}-{index:06d}", media=f"{self.split}/{index}",
                       annotations=self.world.instruction(self.world.scene(self.split, index)))
                for index in range(self.num)]

    def info(self) -> dict:
        base = Source.info(self)
        return {**base, "num": self.num, "seed": self.world.seed, "image_size": self.world.image_size,
                "classes": list(INSTRUCTION_CLASSES), "multi_label": False, "instructions": list(INSTRUCTIONS)}
