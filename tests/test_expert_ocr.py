"""`ocrdet` with EasyOCR's real CRAFT + english_g2 weights: words found, indexed, embedded; never wraps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from precompute.experts import ExpertError, get_expert
from precompute.experts.labels import BACKGROUND_ID
from precompute.experts.ocrdet import DETECTOR, MAX_WORDS, RECOGNIZER, Word, index_words
from tiny_ocr import font, link_easyocr_models, sign_image
from tiny_seg import save_tiny_text_encoder

RESOLUTION = 64  # the shapes world's frame: 30 px type becomes 9 px; CRAFT reads the image at DETECT_SIZE
DETECT_SIZE = 256
WORDS = [("STOP", (20, 30)), ("HELLO", (60, 140))]  # 224 px image, 30 px bold type


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_text_encoder(tmp_path_factory.mktemp("models") / "tiny-bert"))


@pytest.fixture(scope="module")
def expert(text_encoder: str):
    expert = get_expert("ocrdet", resolution=RESOLUTION, detect_size=DETECT_SIZE, text_encoder=text_encoder)
    expert.load()
    return expert


def run(expert, images: list[Image.Image]) -> dict:
    return expert.predict(torch.stack([expert.preprocess(image) for image in images]), {})


def ink_box(origin: tuple[int, int], word: str, image_size: int = 224) -> tuple[slice, slice]:
    """The word's ink box in frame pixels (rows, columns)."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(origin, word, font=font(30))
    scale = RESOLUTION / image_size
    return slice(round(top * scale), round(bottom * scale)), slice(round(left * scale), round(right * scale))


def test_printed_words_are_found_indexed_and_embedded(expert) -> None:
    blank = Image.new("RGB", (224, 224), (240, 240, 235))
    out = run(expert, [sign_image(WORDS), blank])

    assert out["words"].dtype == np.uint8 and out["words"].shape == (2, 1, RESOLUTION, RESOLUTION)
    assert out["text"][0] == "stop\nhello"  # exact: clear bold type reads without errors
    word_map = out["words"][0, 0]
    covered = np.zeros_like(word_map, dtype=bool)
    for index, (word, origin) in enumerate(WORDS):
        rows, cols = ink_box(origin, word)
        assert (word_map[rows, cols] == index).mean() > 0.9, f"{word} is not labelled {index} where it is printed"
        covered[max(rows.start - 3, 0) : rows.stop + 3, max(cols.start - 3, 0) : cols.stop + 3] = True
    assert (word_map[~covered] == BACKGROUND_ID).all(), "word pixels far from any printed word"
    assert set(np.unique(word_map)) == {0, 1, BACKGROUND_ID}

    embeddings = out["embeddings"]
    assert len(embeddings) == 2
    assert embeddings[0].dtype == np.float16 and embeddings[0].shape == (2, 64)
    np.testing.assert_array_equal(embeddings[0], expert.embedder.project(["stop", "hello"]))

    # No text: an all-background map, no words, no vectors: a valid label, not a gap.
    assert (out["words"][1] == BACKGROUND_ID).all()
    assert out["text"][1] == ""
    assert embeddings[1].dtype == np.float16 and embeddings[1].shape == (0, 64)


def test_deterministic_and_independent_of_the_batch(expert) -> None:
    images = [sign_image(WORDS), sign_image([("EXIT", (100, 80))], font_size=40)]
    first, second = run(expert, images), run(expert, images)
    alone = run(expert, images[1:])
    assert first["words"].tobytes() == second["words"].tobytes()
    assert first["text"] == second["text"] and first["text"][1] == "exit"
    for a, b in zip(first["embeddings"], second["embeddings"]):
        assert a.tobytes() == b.tobytes()
    assert alone["words"][0].tobytes() == first["words"][1].tobytes()
    assert alone["embeddings"][0].tobytes() == first["embeddings"][1].tobytes()


def test_spec_names_what_changes_the_bytes(expert, text_encoder: str) -> None:
    spec = expert.spec("ocrdet")
    r = RESOLUTION
    assert [(a.name, a.dtype, a.shape, a.ragged) for a in spec.arrays] == [
        ("words", "uint8", (1, r, r), False),
        ("text", "str", (), False),
        ("embeddings", "float16", (MAX_WORDS, 64), True),
    ]
    assert spec.model_id == "easyocr/craft_mlt_25k+english_g2"
    assert spec.revision == f"md5:{DETECTOR['md5sum']}+{RECOGNIZER['md5sum']}"
    assert spec.params["detect_size"] == DETECT_SIZE and spec.params["resolution"] == r
    assert spec.params["text_encoder"] == str(Path(text_encoder).resolve())
    assert spec.params["text_encoder_revision"].startswith("sha256:")
    assert {"min_confidence", "projection"} <= set(spec.params)

    smaller = get_expert("ocrdet", resolution=r, detect_size=192, text_encoder=text_encoder)
    smaller.load()
    assert smaller.spec("ocrdet").preprocess_hash != spec.preprocess_hash


def test_any_directory_with_the_weights_loads_with_the_same_identity(tmp_path: Path, expert, text_encoder: str) -> None:
    moved = get_expert("ocrdet", model=str(link_easyocr_models(tmp_path / "ocr")), resolution=RESOLUTION,
                       detect_size=DETECT_SIZE, text_encoder=text_encoder)
    moved.load()
    assert moved.spec("ocrdet") == expert.spec("ocrdet")  # provenance is the weights, not where they lie


@pytest.mark.parametrize("files, missing", [((), DETECTOR["filename"]),
                                            ((DETECTOR["filename"],), RECOGNIZER["filename"])])
def test_a_directory_without_the_weights_is_refused(tmp_path: Path, files: tuple[str, ...], missing: str) -> None:
    expert = get_expert("ocrdet", model=str(link_easyocr_models(tmp_path / "ocr", files)))
    with pytest.raises(ExpertError, match=missing):
        expert.load()


def test_other_weights_under_the_right_names_are_refused(tmp_path: Path) -> None:
    directory = link_easyocr_models(tmp_path / "ocr", (DETECTOR["filename"],))
    (directory / RECOGNIZER["filename"]).write_bytes(b"not the published recogniser")
    with pytest.raises(ExpertError, match="MD5 mismatch"):
        get_expert("ocrdet", model=str(directory)).load()


def test_bad_references_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExpertError, match="no such model directory"):
        get_expert("ocrdet", model=str(tmp_path / "absent")).load()
    with pytest.raises(ExpertError, match="detect_size"):
        get_expert("ocrdet", detect_size=8)
    with pytest.raises(ExpertError, match="min_confidence"):
        get_expert("ocrdet", min_confidence=1.5)


def square(x: float, y: float, side: float) -> np.ndarray:
    return np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]])


def test_more_than_255_words_keep_the_most_confident_and_never_wrap() -> None:
    rng = np.random.default_rng(0)
    confidences = rng.permutation(300) / 300  # distinct, shuffled over the grid
    # 20 columns x 15 rows of 8 px squares on a 240 px frame: row-major is the reading order.
    words = [Word(square(12 * (i % 20) + 2, 16 * (i // 20) + 2, 8), f"w{i}", float(c))
             for i, c in enumerate(confidences)]
    word_map, kept = index_words(words, 240)

    assert len(kept) == MAX_WORDS == 255
    assert {w.text for w in kept} == {words[i].text for i in np.argsort(-confidences)[:255]}
    assert [int(w.text[1:]) for w in kept] == sorted(int(w.text[1:]) for w in kept)  # reading order
    assert word_map.dtype == np.uint8 and set(np.unique(word_map)) == set(range(255)) | {BACKGROUND_ID}
    for index, word in enumerate(kept):  # each square holds exactly its own index
        x, y = word.polygon[0].astype(int)
        assert (word_map[y : y + 8, x : x + 8] == index).all()


def test_reading_order_overlap_and_tiny_polygons() -> None:
    below = Word(square(2, 20, 10), "below", 0.9)
    right = Word(square(14, 3, 10), "right", 0.9)  # centre 1 px lower than `left`'s: same line
    left = Word(square(4, 2, 12), "left", 0.9)
    speck = Word(square(30.2, 30.2, 0.3), "speck", 0.9)  # inside pixel (30, 30), covers no pixel centre
    word_map, kept = index_words([below, right, left, speck], 40)

    assert [w.text for w in kept] == ["left", "right", "below", "speck"]
    assert word_map[5, 15] == 1  # `left` and `right` overlap at x 14-16: the later word wins
    assert word_map[30, 30] == 3 and (word_map == 3).sum() == 1
    empty_map, none = index_words([], 40)
    assert none == [] and (empty_map == BACKGROUND_ID).all()
