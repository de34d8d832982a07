"""Sources and image decoding, on tiny datasets written into tmp_path in their published layouts."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.decode import decode_image, decode_image_tensor
from precompute.sources import SOURCES, MediaError, Sample, SourceError, get_source
from precompute.sources.shapes import COLORS, DETECTION_CLASSES, PAINT, SEG_CLASSES, SHAPES, SIGN_PAINT, ShapesWorld


def save_image(path: Path, color=(200, 30, 30), size=(8, 6), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def noisy_jpeg_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# --- decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["precompute.decode", "precompute.decode_media"])
def test_decoders_stand_alone_without_the_sources(module):
    """Decoding and its error live together: importing a decoder first, in a fresh interpreter,
    needs no source (it once pulled in precompute.sources, which import the decoders back)."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'precompute.sources' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert MediaError.__module__ == "precompute.decode"



@pytest.fixture(params=["pillow", "tensor"])
def decode(request):
    """Both image decoders, for every hostile case: `decode_image` (Pillow), and `decode_image_tensor`
    (JPEG through torchvision's libjpeg-turbo, the rest through Pillow) seen as an image, so one
    set of cases holds both to the same pixels and the same refusals."""
    if request.param == "pillow":
        return decode_image
    return lambda path, **options: Image.fromarray(decode_image_tensor(path, **options).permute(1, 2, 0).numpy())


def test_decode_zero_byte_file(tmp_path, decode):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        decode(path)


def test_decode_truncated_jpeg(tmp_path, decode):
    data = noisy_jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated"):
        decode(path)


def test_decode_truncated_png(tmp_path, decode):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(MediaError):
        decode(path)


def test_decode_random_bytes(tmp_path, decode):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="not an image"):
        decode(path)


def test_decode_missing_file(tmp_path, decode):
    with pytest.raises(MediaError, match="not found"):
        decode(tmp_path / "absent.png")


def test_decode_grayscale(tmp_path, decode):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 77).save(path)
    image = decode(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((2, 2)) == (77, 77, 77)


def test_decode_palette_and_transparent_palette(tmp_path, decode):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 120, 240] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert decode(tmp_path / "palette.png").getpixel((0, 0)) == (10, 120, 240)

    transparent = Image.new("P", (4, 4), 0)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent.putpixel((1, 1), 1)
    transparent.save(tmp_path / "transparent.png", transparency=0)
    image = decode(tmp_path / "transparent.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent black becomes white
    assert image.getpixel((1, 1)) == (255, 0, 0)


def test_decode_cmyk_jpeg(tmp_path, decode):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = decode(path).getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60


def test_decode_16_bit_png_is_scaled_not_clipped(tmp_path, decode):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = decode(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 128, 255]


def test_decode_32_bit_integer_tiff(tmp_path, decode):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert decode(path).getpixel((1, 0)) == (255, 255, 255)

    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(MediaError, match="outside 0..65535"):
        decode(path)


def test_decode_rgba_composites_on_white(tmp_path, decode):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    image = decode(tmp_path / "rgba.png")
    assert image.getpixel((0, 0)) == (0, 0, 255)
    assert image.getpixel((1, 0)) == (127, 127, 127)
    assert image.getpixel((3, 3)) == (255, 255, 255)

    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert decode(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation(tmp_path, decode):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    image.save(tmp_path / "phone.png", exif=exif)
    upright = decode(tmp_path / "phone.png")
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == (255, 0, 0)


def test_decode_refuses_decompression_bomb(tmp_path, decode):
    """A PNG whose header claims 100000 x 100000 pixels is refused before any pixel is decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="too large"):
        decode(path)

    with pytest.raises(MediaError, match="too large"):
        decode(save_image(tmp_path / "small.png", size=(20, 20)), max_pixels=100)


def test_decode_float_image_is_refused(tmp_path, decode):
    Image.fromarray(np.zeros((2, 2), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(MediaError, match="floating-point"):
        decode(tmp_path / "float.tif")


# --- registry -----------------------------------------------------------------------------


def test_registry_names_and_errors(tmp_path):
    assert set(SOURCES) == {"shapes", "images", "coco", "vqav2", "food101", "mmimdb", "snli-ve", "videos", "audio",
                            "msrvtt", "msvd", "audiocaps", "shapes-video", "wds", "tabletop", "tabletop-instruct"}
    with pytest.raises(SourceError, match="known sources: .*shapes"):
        get_source("imagenet", tmp_path, "train")
    with pytest.raises(SourceError, match="known options: image_size, num, seed"):
        get_source("shapes", None, "train", colour="red")
    with pytest.raises(SourceError, match="splits: train, val, test"):
        get_source("shapes", None, "dev")
    with pytest.raises(SourceError, match="takes no data root"):
        get_source("shapes", tmp_path, "train")
    with pytest.raises(SourceError, match="needs a data root"):
        get_source("coco", None, "train")
    assert get_source("shapes", None, None).split == "train"


@pytest.mark.parametrize("name", ["images", "coco", "vqav2"])
def test_missing_data_root_names_the_path(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError, match=re.escape(str(missing))):
        get_source(name, missing, SOURCES[name].splits[0])


# --- images -------------------------------------------------------------------------------


def test_images_finds_every_extension_recursively(tmp_path):
    save_image(tmp_path / "a.jpg")
    save_image(tmp_path / "deep" / "er" / "b.PNG", fmt="PNG")
    save_image(tmp_path / "deep" / "c.WebP", fmt="WEBP")
    save_image(tmp_path / "d.JPEG", fmt="JPEG")
    save_image(tmp_path / "e.jpeg")
    save_image(tmp_path / ".hidden" / "f.jpg")
    save_image(tmp_path / "._g.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    source = get_source("images", tmp_path, "all")
    samples = source.samples()
    assert [s.key for s in samples] == ["a", "d", "deep/c", "deep/er/b", "e"]
    assert all(Path(s.media).is_absolute() and s.annotations == {} for s in samples)
    assert source.load_image(samples[2]).size == (8, 6)


def test_images_refuses_ambiguous_keys_and_empty_folders(tmp_path):
    save_image(tmp_path / "x.jpg")
    save_image(tmp_path / "x.png")
    with pytest.raises(SourceError, match="share the sample key 'x'"):
        get_source("images", tmp_path, "all").samples()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .* files under"):
        get_source("images", tmp_path / "empty", "all").samples()


def test_images_broken_file_is_a_media_error(tmp_path):
    save_image(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"")
    source = get_source("images", tmp_path, "all")
    bad, good = source.samples()
    assert source.load_image(good).mode == "RGB"
    with pytest.raises(MediaError, match="empty"):
        source.load_image(bad)


# --- coco ---------------------------------------------------------------------------------


def write_coco(root: Path, year: str, split: str, ids: list[int]) -> None:
    def file_name(i):
        return f"{i:012d}.jpg" if year == "2017" else f"COCO_{split}{year}_{i:012d}.jpg"

    for i in ids:
        save_image(root / f"{split}{year}" / file_name(i))
    write_json(
        root / "annotations" / f"captions_{split}{year}.json",
        {
            "images": [{"id": i, "file_name": file_name(i)} for i in ids],
            "annotations": [
                {"id": 10 * i + k, "image_id": i, "caption": f"image {i} caption {k} "}
                for i in ids
                for k in (1, 0)
            ],
        },
    )


def karpathy_entry(image_id: int, folder: str, split: str) -> dict:
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{image_id:012d}.jpg",
        "cocoid": image_id,
        "split": split,
        "sentences": [{"raw": f"A raw caption of {image_id}. ", "tokens": ["a"]}],
    }


def test_coco_official_2017(tmp_path):
    write_coco(tmp_path, "2017", "val", [391895, 42])
    source = get_source("coco", tmp_path, "val")
    samples = source.samples()
    assert [s.key for s in samples] == ["000000000042", "000000391895"]
    assert samples[1].annotations == {
        "captions": ["image 391895 caption 0", "image 391895 caption 1"],
        "image_id": 391895,
    }
    assert source.load_image(samples[0]).size == (8, 6)
    assert source.info()["year"] == "2017"
    json.dumps(source.info())


def test_coco_finds_2014_and_checks_year(tmp_path):
    write_coco(tmp_path, "2014", "train", [7])
    source = get_source("coco", tmp_path, "train")
    (sample,) = source.samples()
    assert sample.media.endswith("train2014/COCO_train2014_000000000007.jpg")
    with pytest.raises(SourceError, match="captions_train2017.json"):
        get_source("coco", tmp_path, "train", year=2017)
    with pytest.raises(SourceError, match="year must be one of"):
        get_source("coco", tmp_path, "train", year=2015)
    with pytest.raises(SourceError, match="Karpathy"):
        get_source("coco", tmp_path, "test")


def test_coco_malformed_annotation_names_the_file(tmp_path):
    write_coco(tmp_path, "2017", "val", [1])
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text('{"images": [')
    with pytest.raises(SourceError, match=re.escape(str(path))):
        get_source("coco", tmp_path, "val").samples()

    write_json(path, {"images": [{"id": 1}], "annotations": []})
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*'file_name'"):
        get_source("coco", tmp_path, "val").samples()

    write_json(path, {"images": []})
    with pytest.raises(SourceError, match="no 'annotations' list"):
        get_source("coco", tmp_path, "val").samples()


def test_coco_karpathy_splits(tmp_path):
    for folder, i in (("train2014", 1), ("val2014", 2), ("val2014", 3), ("val2014", 4)):
        save_image(tmp_path / folder / f"COCO_{folder}_{i:012d}.jpg")
    entries = [
        karpathy_entry(1, "train2014", "train"),
        karpathy_entry(2, "val2014", "restval"),
        karpathy_entry(3, "val2014", "test"),
        karpathy_entry(4, "val2014", "test"),
    ]
    write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})

    test = get_source("coco", tmp_path, "test")
    samples = test.samples()
    assert [s.key for s in samples] == ["000000000003", "000000000004"]
    assert samples[0].annotations == {"captions": ["A raw caption of 3."], "image_id": 3}
    assert test.load_image(samples[1]).size == (8, 6)
    assert [s.key for s in get_source("coco", tmp_path, "restval").samples()] == ["000000000002"]
    assert test.info()["karpathy"] is True

    with pytest.raises(SourceError, match="Karpathy"):
        get_source("coco", tmp_path, "test", karpathy=False)
    with pytest.raises(SourceError, match="missing.json"):
        get_source("coco", tmp_path, "test", karpathy=tmp_path / "missing.json")


def test_coco_karpathy_over_2017_folders(tmp_path):
    save_image(tmp_path / "train2017" / f"{1:012d}.jpg")
    save_image(tmp_path / "val2017" / f"{2:012d}.jpg")
    split_file = write_json(
        tmp_path / "elsewhere" / "karpathy.json",
        {"images": [karpathy_entry(1, "val2014", "val"), karpathy_entry(2, "val2014", "val")]},
    )
    source = get_source("coco", tmp_path, "val", karpathy=split_file)
    media = [s.media for s in source.samples()]
    assert media == [
        str(tmp_path / "train2017" / "000000000001.jpg"),
        str(tmp_path / "val2017" / "000000000002.jpg"),
    ]
    assert all(source.load_image(s).mode == "RGB" for s in source.samples())


# --- vqav2 --------------------------------------------------------------------------------


def write_vqav2(root: Path) -> None:
    questions = [
        {"image_id": 5, "question": "What color is the cat?", "question_id": 5001},
        {"image_id": 5, "question": "Is it day?", "question_id": 5000},
        {"image_id": 9, "question": "How many?", "question_id": 9000},
    ]
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
    annotations = [
        {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "answers": [{"answer": f"a{k}", "answer_id": k + 1} for k in range(10)],
            "answer_type": "other",
            "multiple_choice_answer": "a0",
        }
        for q in questions
    ]
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    write_json(root / "v2_OpenEnded_mscoco_test2015_questions.json", {"questions": questions[:1]})
    for i in (5, 9):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    save_image(root / "test2015" / f"COCO_test2015_{5:012d}.jpg")


def test_vqav2_groups_questions_per_image(tmp_path):
    write_vqav2(tmp_path)
    source = get_source("vqav2", tmp_path, "val")
    samples = source.samples()
    assert [s.key for s in samples] == ["000000000005", "000000000009"]
    first = samples[0].annotations
    assert first["image_id"] == 5
    assert [q["question_id"] for q in first["questions"]] == [5000, 5001]
    assert first["questions"][0] == {
        "question_id": 5000,
        "question": "Is it day?",
        "answers": [f"a{k}" for k in range(10)],
        "answer_type": "other",
        "multiple_choice_answer": "a0",
    }
    assert source.load_image(samples[1]).size == (8, 6)


def test_vqav2_test_split_has_no_answers(tmp_path):
    write_vqav2(tmp_path)
    source = get_source("vqav2", tmp_path, "test")
    (sample,) = source.samples()
    assert sample.annotations["questions"] == [
        {"question_id": 5001, "question": "What color is the cat?"}
    ]
    assert source.load_image(sample).mode == "RGB"


def test_vqav2_bad_files_are_named(tmp_path):
    write_vqav2(tmp_path)
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    write_json(annotations, {"annotations": []})
    with pytest.raises(SourceError, match="no answers for question 5000"):
        get_source("vqav2", tmp_path, "val").samples()
    annotations.write_text("not json")
    with pytest.raises(SourceError, match=re.escape(str(annotations))):
        get_source("vqav2", tmp_path, "val").samples()
    annotations.unlink()
    with pytest.raises(SourceError, match=re.escape(str(annotations))):
        get_source("vqav2", tmp_path, "val")
    with pytest.raises(SourceError, match="train2014_questions.json"):
        get_source("vqav2", tmp_path, "train")


# --- shapes -------------------------------------------------------------------------------


def test_shapes_is_deterministic():
    first, second = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for index in range(20):
        scene = first.scene("train", index)
        assert scene == second.scene("train", index)
        assert first.render(scene).tobytes() == second.render(scene).tobytes()
        assert first.questions(scene) == second.questions(scene)
        assert first.captions(scene) == second.captions(scene)

    other_seed = ShapesWorld(seed=4)
    scenes = [first.scene("train", i) for i in range(20)]
    assert scenes != [other_seed.scene("train", i) for i in range(20)]
    other_pixels = other_seed.render(other_seed.scene("train", 0)).tobytes()
    assert first.render(scenes[0]).tobytes() != other_pixels
    assert first.scene("train", 0).objects != first.scene("val", 0).objects


def test_shapes_scenes_follow_the_rules():
    world = ShapesWorld()
    counts = Counter()
    for index in range(300):
        objects = world.scene("train", index).objects
        counts[len(objects)] += 1
        assert len({o.color for o in objects}) == len(objects)
        for o in objects:
            assert abs(o.x - 0.5) >= 0.06 and o.size / 2 <= o.x <= 1 - o.size / 2
        xs = sorted(o.x for o in objects)
        assert all(b - a >= 0.1 for a, b in zip(xs, xs[1:]))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60


def test_shapes_pixels_show_every_object():
    world = ShapesWorld(image_size=64)
    for index in range(50):
        scene = world.scene("val", index)
        image = world.render(scene)
        assert image.mode == "RGB" and image.size == (64, 64)
        for o in scene.objects:
            assert image.getpixel((int(o.x * 64), int(o.y * 64))) == PAINT[o.color]
    assert ShapesWorld(image_size=32).render(scene).size == (32, 32)


def answer_from_scene(question: str, objects) -> str:
    """An independent reading of each question against the scene's objects."""
    by_name = {f"{o.color} {o.shape}": o for o in objects}
    by_x = sorted(objects, key=lambda o: o.x)
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if f"{m[1]} {m[2]}" in by_name else "no"
    if question == "what color is the leftmost shape?":
        return by_x[0].color
    if question == "what color is the rightmost shape?":
        return by_x[-1].color
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (match,) = [o for o in objects if o.shape == m[1]]
        return match.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (match,) = [o for o in objects if o.color == m[1]]
        return match.shape
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"is the (\w+ \w+) left of the (\w+ \w+)\?", question):
        return "yes" if by_name[m[1]].x < by_name[m[2]].x else "no"
    if m := re.fullmatch(r"where is the (\w+ \w+)\?", question):
        return "left" if by_name[m[1]].x < 0.5 else "right"
    raise AssertionError(f"unexpected question {question!r}")


def test_shapes_answers_and_labels_match_the_scene():
    world = ShapesWorld()
    vocabulary = set(world.vocabulary())
    for index in range(300):
        scene = world.scene("test", index)
        questions = world.questions(scene)
        assert len(questions) == 5
        for q in questions:
            assert len(q["answers"]) == 10 and len(set(q["answers"])) == 1
            assert q["answers"][0] == answer_from_scene(q["question"], scene.objects)
            assert q["answer_type"] == {"yes": "yes/no", "no": "yes/no"}.get(
                q["answers"][0], "number" if q["answers"][0].isdigit() else "other"
            )
        captions = world.captions(scene)
        assert len(captions) == len(set(captions)) == 5
        texts = captions + [q["question"] for q in questions] + [q["answers"][0] for q in questions]
        for text in texts:
            assert set(re.findall(r"[a-z0-9]+", text)) <= vocabulary, text

        labels = world.labels(scene)
        assert len(labels["presence"]) == 18 and labels["count"] == len(scene.objects)
        for o in scene.objects:
            c = COLORS.index(o.color)
            assert labels["presence"][c * 3 + SHAPES.index(o.shape)] == 1
            assert labels["left_right"][c] == (1 if o.x < 0.5 else 2)
        assert sum(labels["presence"]) == len(scene.objects)
        assert sum(v > 0 for v in labels["left_right"]) == len(scene.objects)


def blind_accuracy(fit_on: list[dict], evaluate_on: list[dict], template) -> float:
    """Accuracy of answering each question with the most common answer of its template."""
    answers = defaultdict(Counter)
    for q in fit_on:
        answers[template(q["question"])][q["answers"][0]] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in answers.items()}
    hits = [guess.get(template(q["question"])) == q["answers"][0] for q in evaluate_on]
    return float(np.mean(hits))


def test_shapes_questions_cannot_be_answered_blind():
    world = ShapesWorld()

    def questions(split):
        return [q for i in range(500) for q in world.questions(world.scene(split, i))]

    train, val = questions("train"), questions("val")
    slots = r"\b(" + "|".join(COLORS + SHAPES) + r")\b"
    per_template = blind_accuracy(train, train, lambda q: re.sub(slots, "_", q))
    per_question_held_out = blind_accuracy(train, val, lambda q: q)
    assert per_template < 0.45
    assert per_question_held_out < 0.45
    yes_no = [q["answers"][0] for q in train if q["answer_type"] == "yes/no"]
    assert yes_no.count("yes") / len(yes_no) == pytest.approx(0.5, abs=0.05)


def test_shapes_truth_matches_the_picture():
    """Prismer's stand-ins learn from `truth`: it must describe the rendered pixels exactly."""
    world = ShapesWorld(seed=0, image_size=64)
    signs = 0
    for index in range(40):
        scene = world.scene("train", index)
        truth = world.truth(scene, 64)
        pixels = np.asarray(world.render(scene)).astype(int)
        for i, obj in enumerate(scene.objects):
            mask = truth["instances"] == i
            assert mask.sum() > 20
            assert np.abs(pixels[mask] - PAINT[obj.color]).max() == 0  # every pixel of the mask shows the object
            assert (truth["classes"][mask] == SEG_CLASSES.index(obj.shape)).all()
            assert (truth["inverse_depth"][mask] == np.float32(obj.nearness)).all()
        background = truth["instances"] == 255
        assert (truth["classes"][background] == 0).all() and (truth["inverse_depth"][background] == 0).all()
        nearness = [o.nearness for o in scene.objects]
        assert nearness == sorted(nearness) and nearness[-1] == 1.0  # drawn far to near
        assert [DETECTION_CLASSES[c] for c in truth["box_classes"]] == [f"{o.color} {o.shape}" for o in scene.objects]
        for i in range(len(scene.objects)):
            mask = np.pad(truth["instances"] == i, 1, mode="edge")
            interior = (mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))[1:-1, 1:-1]
            outline = mask[1:-1, 1:-1] & ~interior
            assert truth["edges"][outline].all() and not truth["edges"][interior].any()
        if scene.sign:
            signs += 1
            x0, y0, x1, y1 = (np.array(truth["word_boxes"][0]) * 64).round().astype(int)
            ink = np.abs(pixels[y0:y1, x0:x1] - np.array(SIGN_PAINT)).max(axis=-1) < 40
            assert ink.sum() > 10 and (truth["instances"][y0:y1, x0:x1] == 255).all()  # the word touches no object
    assert 10 < signs < 30


def test_shapes_source_samples():
    source = get_source("shapes", None, "val", num="12", image_size=32, seed=1)
    samples = source.samples()
    assert len(samples) == 12
    assert samples[7] == Sample(
        key="shapes-val-000007", media="val/7", annotations=samples[7].annotations
    )
    assert set(samples[7].annotations) == {"captions", "questions", "labels", "sign", "text", "label"}
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    json.dumps([s.annotations for s in samples])
    json.dumps(source.info())

    revived = pickle.loads(pickle.dumps(source))
    image = revived.load_image(pickle.loads(pickle.dumps(samples[7])))
    world = ShapesWorld(seed=1, image_size=32)
    assert image.tobytes() == world.render(world.scene("val", 7)).tobytes()
    assert len(get_source("shapes", None, "train").samples()) == 2000

    with pytest.raises(MediaError, match="not a shapes locator"):
        source.load_image(Sample("x", "elsewhere/3", {}))
    with pytest.raises(SourceError, match="num must be an integer"):
        get_source("shapes", None, "val", num="many")
    with pytest.raises(SourceError, match="image_size must be in"):
        get_source("shapes", None, "val", image_size=2)
