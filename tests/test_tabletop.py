"""The `tabletop` world: each expert's question type is answerable from the picture, not from the
question or the captions, and the truth the stand-ins learn from describes the rendered pixels."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from precompute.sources import get_source
from precompute.sources.base import MediaError, Sample
from precompute.sources.shapes import COLORS, PAINT, SHAPES
from precompute.sources.tabletop import (
    FORMS,
    HORIZON,
    INSTRUCTIONS,
    MIN_VISIBLE,
    QUESTION_TYPES,
    SEG_CLASSES,
    SIGN_WORDS,
    TabletopWorld,
)


def questions(world: TabletopWorld, split: str, count: int) -> list[dict]:
    return [q for i in range(count) for q in world.questions(world.scene(split, i))]


def test_deterministic_and_distinct_per_seed_and_split():
    world = TabletopWorld(seed=0)
    assert world.scene("train", 5) == TabletopWorld(seed=0).scene("train", 5)
    assert np.array_equal(np.asarray(world.render(world.scene("train", 5))),
                          np.asarray(TabletopWorld(seed=0).render(world.scene("train", 5))))
    assert world.scene("train", 5) != world.scene("val", 5)
    assert world.scene("train", 5) != TabletopWorld(seed=1).scene("train", 5)


def test_every_question_type_once_per_scene_and_blind_guesses_stay_near_chance():
    """The best answer per question template (colour and shape names blanked), fitted on train
    scenes and scored on val scenes, is near chance for every type."""
    world = TabletopWorld()
    train, val = questions(world, "train", 600), questions(world, "val", 300)
    assert [q["answer_type"] for q in train[:6]] == list(QUESTION_TYPES)
    slots = r"\b(" + "|".join(COLORS + SHAPES) + r")\b"
    template = lambda q: re.sub(slots, "_", q)  # noqa: E731
    bars = {"depth": 0.6, "form": 0.6, "count": 0.42, "sign": 0.06, "color": 0.25, "side": 0.6}
    for kind, bar in bars.items():
        guess = defaultdict(Counter)
        for q in train:
            if q["answer_type"] == kind:
                guess[template(q["question"])][q["answers"][0]] += 1
        best = {t: c.most_common(1)[0][0] for t, c in guess.items()}
        held_out = [q for q in val if q["answer_type"] == kind]
        accuracy = np.mean([best.get(template(q["question"])) == q["answers"][0] for q in held_out])
        assert accuracy < bar, (kind, accuracy)


def test_captions_never_name_what_the_experts_know():
    world = TabletopWorld()
    forbidden = {"near", "nearer", "nearest", "far", "flat", "round", *SIGN_WORDS}
    for index in range(300):
        scene = world.scene("train", index)
        words = set(" ".join(world.captions(scene)).replace(",", " ").split())
        assert not words & forbidden, words & forbidden
        for color in COLORS:  # how many of one colour is never said: no "<number> <colour>"
            assert not re.search(rf"\b(one|two|three|four) {color}\b", " ".join(world.captions(scene)))


def test_answers_agree_with_the_scene_and_quantities():
    world = TabletopWorld()
    for index in range(200):
        scene = world.scene("val", index)
        asked = {q["answer_type"]: q for q in world.questions(scene)}
        quantities = world.quantities(scene)
        assert asked["sign"]["answers"][0] == scene.word == SIGN_WORDS[quantities["sign"]]
        count = int(asked["count"]["answers"][0])
        assert count == sum(o.color == scene.asked_color for o in scene.objects) == quantities["count"] + 1
        assert scene.objects[-1].z == min(o.z for o in scene.objects)  # drawn far to near
        assert FORMS[quantities["form"]] == scene.objects[-1].form
        by_name = {f"{o.color} {o.shape}": o for o in scene.objects}
        assert len(by_name) == len(scene.objects)  # every colour + shape names one object
        a, b = re.match(r"is the (\w+ \w+) nearer than the (\w+ \w+)\?", asked["depth"]["question"]).groups()
        assert asked["depth"]["answers"][0] == ("yes" if by_name[a].z < by_name[b].z else "no")
        assert abs(by_name[a].z - by_name[b].z) >= 0.3 - 1e-9
        shown = re.match(r"is the (\w+ \w+) flat or round\?", asked["form"]["question"]).group(1)
        assert asked["form"]["answers"][0] == by_name[shown].form


def test_truth_describes_the_pixels():
    world = TabletopWorld(seed=0, image_size=64)
    for index in range(40):
        scene = world.scene("train", index)
        pixels = np.asarray(world.render(scene)).astype(int)
        truth = world.truth(scene, 64)
        instances = truth["instances"]
        for i, obj in enumerate(scene.objects):
            mine = instances == i
            assert mine.sum() >= MIN_VISIBLE * world._mask(obj, 64).sum() - 2  # nobody is mostly hidden
            # the object's own paint (shaded: a positive multiple of its colour) is where truth says
            hue = pixels[mine] / np.clip(pixels[mine].max(axis=1, keepdims=True), 1, None)
            paint = np.array(PAINT[obj.color]) / max(PAINT[obj.color])
            assert np.abs(hue - paint).max() < 0.06
            assert truth["inverse_depth"][mine].min() >= 1 / obj.z - 1e-6
            if obj.form == "flat":
                assert np.allclose(truth["normals"][mine], (0, 0, 1))
                assert truth["inverse_depth"][mine] == pytest.approx(1 / obj.z)
            else:
                assert truth["normals"][mine][:, :2].std(axis=0).max() > 0.1
                assert truth["inverse_depth"][mine].max() > 1.05 / obj.z  # it bulges toward the viewer
        floor = instances == 255
        rows = np.nonzero(floor)[0]
        assert (truth["classes"][floor & (np.arange(64)[:, None] > HORIZON * 64 + 1)] == SEG_CLASSES.index("floor")).all()
        assert (truth["inverse_depth"][floor][rows / 64 < HORIZON - 0.02] == 0).all()
        assert truth["words"] == [scene.word]
        x0, y0, x1, y1 = (truth["word_boxes"][0] * 64).round().astype(int)
        assert (pixels[y0:y1, x0:x1] < 80).any()  # the word's ink is inside its box


def test_source_samples_and_locators():
    source = get_source("tabletop", None, "val", num="5", image_size=48, seed=2)
    samples = source.samples()
    assert [s.key for s in samples] == [f"tabletop-val-{i:06d}" for i in range(5)]
    annotations = samples[3].annotations
    assert {"captions", "questions", "labels", "quantities", "sign", "text", "label"} <= set(annotations)
    assert 0 <= annotations["label"] < len(source.info()["classes"]) == 18
    assert source.load_image(samples[3]).size == (48, 48)
    assert set(source.info()["quantities"]) == set(QUESTION_TYPES)
    with pytest.raises(MediaError, match="not a tabletop locator"):
        source.load_image(Sample(key="x", media="nowhere/3", annotations={}))


def instruction_features(world: TabletopWorld, split: str, count: int):
    """Per scene: what the image shows that the instructions ask (colours present, leftmost and
    rightmost colour, leftmost outline; one-hot), the sentence (one-hot over the sentences seen),
    the instruction type and the label."""
    rows = []
    for index in range(count):
        scene = world.scene(split, index)
        task = world.instruction(scene)
        by_x = sorted(scene.objects, key=lambda o: o.x)
        image = np.concatenate([
            [float(any(o.color == c for o in scene.objects)) for c in COLORS],
            np.eye(len(COLORS))[COLORS.index(by_x[0].color)], np.eye(len(COLORS))[COLORS.index(by_x[-1].color)],
            np.eye(len(SHAPES))[SHAPES.index(by_x[0].shape)]])
        rows.append((image, task["text"], task["instruction"], task["label"], scene))
    return rows


def least_squares_accuracy(train_x, train_y, test_x, test_y) -> float:
    """A linear classifier (least squares on ±1 targets, with a bias): what a linear head can do."""
    def design(x):
        return np.hstack([x, np.ones((len(x), 1))])

    weights, *_ = np.linalg.lstsq(design(train_x), 2.0 * np.asarray(train_y) - 1, rcond=None)
    return float(((design(test_x) @ weights > 0) == np.asarray(test_y)).mean())


def test_instruction_task_needs_the_sentence_to_read_the_image():
    """MoPE's conditional task: the answer agrees with the scene; each sentence, each type and each
    kind of scene is as often yes as no; a linear head over [image facts; sentence] (late
    concatenation, even with perfect image features) stays near chance, while letting the sentence
    select among the same facts (their product) answers every question."""
    world = TabletopWorld(seed=0)
    train, test = instruction_features(world, "train", 3000), instruction_features(world, "val", 1000)
    for _image, text, kind, label, scene in train[:300]:
        by_x = sorted(scene.objects, key=lambda o: o.x)
        value = re.match(INSTRUCTIONS[kind].replace("?", r"\?").replace("{value}", "(.+)"), text).group(1)
        truth = {"present": any(o.color == value for o in scene.objects), "leftmost": by_x[0].color == value,
                 "rightmost": by_x[-1].color == value, "leftmost_shape": by_x[0].shape == value}[kind]
        assert label == int(truth), (text, scene)
    labels = np.array([row[3] for row in train])
    assert abs(labels.mean() - 0.5) < 0.03
    for kind in INSTRUCTIONS:
        assert abs(np.mean([row[3] for row in train if row[2] == kind]) - 0.5) < 0.05, kind
    by_size = defaultdict(list)
    for row in train:
        by_size[len(row[4].objects)].append(row[3])
    assert all(abs(np.mean(v) - 0.5) < 0.06 for v in by_size.values() if len(v) > 200), by_size
    # a blind guess: the majority answer of each sentence in training, on held-out scenes
    majority = {text: round(np.mean([r[3] for r in train if r[1] == text])) for text in {r[1] for r in train}}
    blind = np.mean([majority.get(r[1], 1) == r[3] for r in test])
    assert abs(blind - 0.5) < 0.06, blind

    texts = sorted({r[1] for r in train} | {r[1] for r in test})

    def matrices(rows, interact: bool):
        sentence = np.array([np.eye(len(texts))[texts.index(r[1])] for r in rows])
        image = np.array([r[0] for r in rows])
        if interact:
            return np.einsum("ns,ni->nsi", sentence, image).reshape(len(rows), -1)
        return np.hstack([image, sentence])

    late = least_squares_accuracy(matrices(train, False), labels, matrices(test, False), [r[3] for r in test])
    conditional = least_squares_accuracy(matrices(train, True), labels, matrices(test, True), [r[3] for r in test])
    assert late < 0.62, late
    assert conditional > 0.97, conditional


def test_instruct_source_shares_tabletops_pictures():
    source = get_source("tabletop-instruct", None, "val", num="4", image_size=48)
    plain = get_source("tabletop", None, "val", num="4", image_size=48)
    samples = source.samples()
    assert [s.key for s in samples] == [f"tabletop-instruct-val-{i:06d}" for i in range(4)]
    assert set(samples[0].annotations) == {"text", "label", "instruction"}
    assert source.info()["classes"] == ["no", "yes"] and not source.info()["multi_label"]
    assert np.array_equal(np.asarray(source.load_image(samples[2])), np.asarray(plain.load_image(plain.samples()[2])))
