"""The classification sources (MoPE's data), on tiny datasets written into tmp_path in their
published layouts, and the shapes world's image+text task."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.sources import SOURCES, MediaError, SourceError, get_source
from precompute.sources.mmimdb import GENRES
from precompute.sources.shapes import COUNT_WORDS, FUSION_CLASSES, MATERIALS, ShapesWorld


def save_image(path: Path, color=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("name", ["food101", "mmimdb", "snli-ve"])
def test_missing_data_root_names_the_path(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError, match=re.escape(str(missing))):
        get_source(name, missing, "train")
    assert SOURCES[name].splits == ("train", "val", "test")


# --- food101 ------------------------------------------------------------------------------

FOOD_CLASSES = ("apple_pie", "cheese_plate", "cheesecake")  # '_' sorts before 'c', as in Food-101


def write_food101(root: Path, per_class: int = 30) -> dict[str, list[list[str]]]:
    """texts/{train,test}_titles.csv (headerless "file,text,class") and images/{split}/CLASS/FILE."""
    rows = {"train": [], "test": []}
    for split, numbers in (("train", range(per_class)), ("test", range(per_class, per_class + 2))):
        for class_name in FOOD_CLASSES:
            for n in numbers:
                file_name = f"{class_name}_{n}.jpg"
                save_image(root / "images" / split / class_name / file_name)
                rows[split].append([file_name, f"{class_name} recipe {n}", class_name])
    rows["test"][0][1] = "Mom&#039;s Apple Pie, the best | Taste of Home"  # a comma: quoted by csv
    for split, split_rows in rows.items():
        path = root / "texts" / f"{split}_titles.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(split_rows)
    return rows


def test_food101_reads_the_published_layout(tmp_path):
    rows = write_food101(tmp_path)
    source = get_source("food101", tmp_path, "test")
    samples = source.samples()
    assert [s.key for s in samples] == sorted(Path(r[0]).stem for r in rows["test"])
    first = {s.key: s for s in samples}["apple_pie_30"]
    assert first.annotations == {"text": "Mom's Apple Pie, the best | Taste of Home", "label": 0}
    assert first.media == str(tmp_path / "images" / "test" / "apple_pie" / "apple_pie_30.jpg")
    assert {s.key: s.annotations["label"] for s in samples}["cheesecake_31"] == 2
    assert source.load_image(first).size == (8, 6)
    info = source.info()
    assert info["classes"] == list(FOOD_CLASSES) and info["multi_label"] is False
    json.dumps(info)


def test_food101_val_is_a_fixed_slice_of_train(tmp_path):
    rows = write_food101(tmp_path)
    train = {s.key for s in get_source("food101", tmp_path, "train").samples()}
    val = {s.key for s in get_source("food101", tmp_path, "val").samples()}
    assert train.isdisjoint(val)
    assert train | val == {Path(r[0]).stem for r in rows["train"]}
    assert 0 < len(val) < 0.2 * len(rows["train"])
    assert val == {s.key for s in get_source("food101", tmp_path, "val").samples()}
    val_sample = get_source("food101", tmp_path, "val").samples()[0]
    assert "/images/train/" in val_sample.media  # val images live in train's folders


def test_food101_broken_images_are_media_errors(tmp_path):
    write_food101(tmp_path)
    source = get_source("food101", tmp_path, "test")
    broken, missing = source.samples()[:2]
    corrupt(Path(broken.media))
    Path(missing.media).unlink()
    with pytest.raises(MediaError):
        source.load_image(broken)
    with pytest.raises(MediaError, match="not found"):
        source.load_image(missing)


def test_food101_bad_layouts_are_named(tmp_path):
    write_food101(tmp_path, per_class=2)
    titles = tmp_path / "texts" / "test_titles.csv"
    titles.write_text("apple_pie_9.jpg,a title,apple_pie\napple_pie_10.jpg,no class\n")
    with pytest.raises(SourceError, match=re.escape(str(titles)) + " line 2: expected 'file,text,class'"):
        get_source("food101", tmp_path, "test").samples()
    titles.write_text("pizza_1.jpg,a pizza,pizza\n")
    with pytest.raises(SourceError, match="class 'pizza' of pizza_1.jpg is not a class of"):
        get_source("food101", tmp_path, "test").samples()
    titles.write_text("")
    with pytest.raises(SourceError, match="has no rows"):
        get_source("food101", tmp_path, "test").samples()
    titles.unlink()
    with pytest.raises(SourceError, match=re.escape(str(titles)) + " not found"):
        get_source("food101", tmp_path, "test")
    shutil.rmtree(tmp_path / "images" / "train")
    with pytest.raises(SourceError, match=re.escape(str(tmp_path / "images" / "train")) + " not found"):
        get_source("food101", tmp_path, "val")


# --- mmimdb -------------------------------------------------------------------------------


def write_mmimdb(root: Path) -> None:
    """split.json + dataset/ID.json (IMDb metadata with "plot" and "genres") + dataset/ID.jpeg."""
    movies = {
        "0000008": (["A short plot.", "The longest plot of this movie.", "Same length plot here!!"], ["Romance", "Drama"]),
        "0000012": (["A news reel."], ["News", "Documentary"]),
        "0000020": (["Adults only."], ["Adult", "Drama"]),
        "0000031": ([], ["Comedy"]),
        "0000044": (["A western plot."], ["Western", "Film-Noir", "Western"]),
        "0000051": (["A dev plot."], ["Comedy"]),
        "0000062": (["A test plot."], ["Sci-Fi", "Short"]),
    }
    for movie_id, (plots, genres) in movies.items():
        write_json(root / "dataset" / f"{movie_id}.json", {"title": f"Movie {movie_id}", "plot": plots, "genres": genres, "year": 1999})
        save_image(root / "dataset" / f"{movie_id}.jpeg")
    write_json(root / "split.json", {
        "train": ["0000044", "0000008", "0000012", "0000020", "0000031"],
        "dev": ["0000051"],
        "test": ["0000062"],
    })


def test_mmimdb_reads_the_published_layout(tmp_path):
    write_mmimdb(tmp_path)
    source = get_source("mmimdb", tmp_path, "train")
    samples = source.samples()
    assert [s.key for s in samples] == ["0000008", "0000044"]  # News, Adult and plotless left out
    assert samples[0].annotations == {"text": "The longest plot of this movie.", "label": [0, 2]}
    assert samples[1].annotations["label"] == [GENRES.index("Western"), GENRES.index("Film-Noir")]
    assert samples[0].media == str(tmp_path / "dataset" / "0000008.jpeg")
    assert source.load_image(samples[0]).size == (8, 6)
    (val,) = get_source("mmimdb", tmp_path, "val").samples()
    assert val.key == "0000051" and val.annotations["label"] == [GENRES.index("Comedy")]
    (test,) = get_source("mmimdb", tmp_path, "test").samples()
    assert [GENRES[i] for i in test.annotations["label"]] == ["Sci-Fi", "Short"]
    info = source.info()
    assert len(info["classes"]) == 23 and info["multi_label"] is True
    assert not {"News", "Adult", "Reality-TV", "Talk-Show"} & set(info["classes"])
    json.dumps(info)

    corrupt(tmp_path / "dataset" / "0000044.jpeg")
    with pytest.raises(MediaError):
        source.load_image(samples[1])


def test_mmimdb_bad_layouts_are_named(tmp_path):
    write_mmimdb(tmp_path)
    movie = tmp_path / "dataset" / "0000051.json"
    write_json(movie, {"plot": "a string, not a list", "genres": ["Comedy"]})
    with pytest.raises(SourceError, match=re.escape(str(movie)) + " has no 'plot' list of strings"):
        get_source("mmimdb", tmp_path, "val").samples()
    movie.write_text('{"plot": [')
    with pytest.raises(SourceError, match=re.escape(str(movie)) + " is not valid JSON"):
        get_source("mmimdb", tmp_path, "val").samples()
    movie.unlink()
    with pytest.raises(SourceError, match=re.escape(str(movie)) + " not found"):
        get_source("mmimdb", tmp_path, "val").samples()

    split_file = tmp_path / "split.json"
    write_json(split_file, {"train": [8], "test": []})
    with pytest.raises(SourceError, match="holds 8, not an IMDb id string"):
        get_source("mmimdb", tmp_path, "train").samples()
    with pytest.raises(SourceError, match=re.escape(str(split_file)) + " has no 'dev' list"):
        get_source("mmimdb", tmp_path, "val").samples()
    split_file.unlink()
    with pytest.raises(SourceError, match=re.escape(str(split_file)) + " not found"):
        get_source("mmimdb", tmp_path, "train")


# --- snli-ve ------------------------------------------------------------------------------


def snli_pair(image: str, caption: int, hypothesis: str, label: str, legacy: bool = False) -> dict:
    """One line of snli_ve_*.jsonl: an SNLI pair plus the Flickr30k id (the parses are left out)."""
    pair = {
        "annotator_labels": [label] * 5,
        "captionID": f"{image}.jpg#{caption}",
        "gold_label": label,
        "pairID": f"{image}.jpg#{caption}r1{label[0]}",
        "sentence1": f"Caption {caption} of image {image}.",
        "sentence2": hypothesis,
    }
    pair["Flikr30kID" if legacy else "Flickr30K_ID"] = f"{image}.jpg" if legacy else image
    return pair


def write_snli_ve(root: Path) -> None:
    splits = {
        "train": [snli_pair("1000092795", 0, "Two men are outside.", "entailment"),
                  snli_pair("1000092795", 1, "Nobody is outside.", "contradiction"),
                  snli_pair("3416050480", 4, " A dog runs to its owner. ", "neutral")],
        "dev": [snli_pair("2248487956", 2, "A child plays.", "neutral", legacy=True)],
        "test": [snli_pair("4701339279", 3, "A woman sings.", "entailment")],
    }
    for split, pairs in splits.items():
        (root / f"snli_ve_{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs) + "\n")
        for pair in pairs:
            save_image(root / "flickr30k-images" / f"{pair['captionID'].split('.')[0]}.jpg")


def test_snli_ve_reads_the_published_layout(tmp_path):
    write_snli_ve(tmp_path)
    source = get_source("snli-ve", tmp_path, "train")
    samples = source.samples()
    assert [s.key for s in samples] == ["1000092795.jpg#0r1e", "1000092795.jpg#1r1c", "3416050480.jpg#4r1n"]
    assert samples[1].annotations == {
        "text": "Nobody is outside.",
        "label": 2,
        "sentence1": "Caption 1 of image 1000092795.",
        "image_id": "1000092795",
    }
    assert [s.annotations["label"] for s in samples] == [0, 2, 1]
    assert samples[2].annotations["text"] == "A dog runs to its owner."
    assert samples[0].media == samples[1].media == str(tmp_path / "flickr30k-images" / "1000092795.jpg")
    assert source.load_image(samples[0]).size == (8, 6)
    info = source.info()
    assert info["classes"] == ["entailment", "neutral", "contradiction"] and info["multi_label"] is False
    json.dumps(info)

    (val,) = get_source("snli-ve", tmp_path, "val").samples()  # the first release's "Flikr30kID"
    assert val.annotations["image_id"] == "2248487956" and val.media.endswith("/2248487956.jpg")

    moved = tmp_path / "elsewhere"
    (tmp_path / "flickr30k-images").rename(moved)
    with pytest.raises(SourceError, match="flickr30k-images.*flickr30k_images.*image_dir"):
        get_source("snli-ve", tmp_path, "test")
    (test,) = get_source("snli-ve", tmp_path, "test", image_dir=moved).samples()
    assert test.media == str(moved / "4701339279.jpg")
    corrupt(moved / "4701339279.jpg")
    with pytest.raises(MediaError):
        get_source("snli-ve", tmp_path, "test", image_dir=moved).load_image(test)


def test_snli_ve_bad_files_are_named(tmp_path):
    write_snli_ve(tmp_path)
    pairs = tmp_path / "snli_ve_test.jsonl"
    good = json.dumps(snli_pair("4701339279", 3, "A woman sings.", "entailment"))
    pairs.write_text(good + "\n{not json\n")
    with pytest.raises(SourceError, match=re.escape(str(pairs)) + " line 2 is not valid JSON"):
        get_source("snli-ve", tmp_path, "test").samples()
    pairs.write_text(json.dumps(snli_pair("4701339279", 3, "A woman sings.", "-")) + "\n")
    with pytest.raises(SourceError, match="line 1: gold_label '-' is not one of entailment"):
        get_source("snli-ve", tmp_path, "test").samples()
    no_image = snli_pair("4701339279", 3, "A woman sings.", "entailment")
    del no_image["Flickr30K_ID"]
    pairs.write_text(json.dumps(no_image) + "\n")
    with pytest.raises(SourceError, match=re.escape(str(pairs)) + ": an entry has no field 'Flickr30K_ID'"):
        get_source("snli-ve", tmp_path, "test").samples()
    pairs.write_text(good + "\n" + good + "\n")
    with pytest.raises(SourceError, match="lists sample '4701339279.jpg#3r1e' twice"):
        get_source("snli-ve", tmp_path, "test").samples()
    pairs.write_text("\n")
    with pytest.raises(SourceError, match="has no pairs"):
        get_source("snli-ve", tmp_path, "test").samples()
    pairs.unlink()
    with pytest.raises(SourceError, match=re.escape(str(pairs)) + " not found"):
        get_source("snli-ve", tmp_path, "test")


# --- shapes' image+text task --------------------------------------------------------------


def fusion_scenes(world: ShapesWorld, split: str, n: int) -> list[tuple[int, str, int]]:
    """(object count, sentence, label) per scene."""
    rows = []
    for index in range(n):
        scene = world.scene(split, index)
        task = world.fusion(scene)
        rows.append((len(scene.objects), task["text"], task["label"]))
    return rows


def best_guess_accuracy(fit_on: list[tuple], evaluate_on: list[tuple], seen) -> float:
    """Accuracy of predicting, from what `seen` keeps of a scene, the label most common for it."""
    labels = defaultdict(Counter)
    for row in fit_on:
        labels[seen(row)][row[2]] += 1
    guess = {k: c.most_common(1)[0][0] for k, c in labels.items()}
    return float(np.mean([guess.get(seen(row)) == row[2] for row in evaluate_on]))


def test_shapes_fusion_task_needs_both_modalities():
    world = ShapesWorld()
    train, val = fusion_scenes(world, "train", 500), fusion_scenes(world, "val", 200)

    counts = Counter(label for _, _, label in val)
    assert set(counts) == set(range(9)) and min(counts.values()) >= 10 and max(counts.values()) <= 40

    text_only = best_guess_accuracy(train, val, lambda row: row[1])
    image_only = best_guess_accuracy(train, val, lambda row: row[0])  # the picture shows the count
    assert text_only <= 0.4 and image_only <= 0.4

    for count, text, label in train + val:
        (material,) = [m for m in MATERIALS if re.search(rf"\b{m}\b", text)]
        assert label == (count - 1) * 3 + MATERIALS.index(material)
        assert FUSION_CLASSES[label] == f"{COUNT_WORDS[count]} {material}"
    assert best_guess_accuracy(train, val, lambda row: (row[0], row[1])) == 1.0
    assert len({text for _, text, _ in train}) == len(MATERIALS) * 5  # every template is used


def test_shapes_source_carries_the_fusion_task():
    source = get_source("shapes", None, "val", num=6, image_size=32)
    samples = source.samples()
    world = ShapesWorld(image_size=32)
    for index, sample in enumerate(samples):
        scene = world.scene("val", index)
        assert {k: sample.annotations[k] for k in ("text", "label")} == world.fusion(scene)
        assert sample.annotations["sign"] == ([scene.sign.word] if scene.sign else [])
    info = source.info()
    assert info["classes"] == list(FUSION_CLASSES) and info["multi_label"] is False
    assert FUSION_CLASSES[:4] == ("one wood", "one glass", "one metal", "two wood")
