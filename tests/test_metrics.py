"""Evaluation metrics against hand-worked values from their official definitions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from trainer.eval.caption import _ptb_like_tokenize, caption_metrics, java_available
from trainer.eval.classification import accuracy, f1_scores
from trainer.eval.vqa import exact_match, normalize_answer, vqa_accuracy, vqa_score

needs_java = pytest.mark.skipif(not java_available(), reason="java not on PATH")


# --- VQA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The dog.", "dog"),
        ("dont", "don't"),
        ("Two", "2"),
        ("none", "0"),
        ("an apple", "apple"),
        ("  Yes\n", "yes"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("red,white", "red white"),  # otherwise it becomes a space
        ("1,000", "1000"),  # any digit,digit comma: every mark is deleted
        ("t-shirt", "t shirt"),
        ("what's up?", "what's up"),
        ("Im", "im"),  # the table's capitalised keys never match after lower-casing
    ],
)
def test_normalize_answer_follows_vqa_eval(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_one_match_in_ten_scores_three_tenths() -> None:
    # Leaving out the match leaves 0 matches (0); the other 9 subsets keep 1 match (1/3).
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 / 10 * 1 / 3)


def test_number_word_prediction_matching_three_of_ten() -> None:
    # 3 annotators said "2": leaving one of them out leaves 2 matches (2/3); the other 7 leave 3.
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_full_credit_needs_four_matches_out_of_ten() -> None:
    assert vqa_accuracy("The dog.", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("bird", ["dog"] * 10) == 0.0


def test_fewer_than_ten_answers_leave_one_out_over_what_there_is() -> None:
    # 5 answers, 2 match: leaving a match out leaves 1 (1/3), leaving another out leaves 2 (2/3).
    answers = ["yes", "yes", "no", "no", "no"]
    assert vqa_accuracy("yes", answers) == pytest.approx((2 * 1 / 3 + 3 * 2 / 3) / 5)
    with pytest.raises(ValueError, match="at least 2"):
        vqa_accuracy("yes", ["yes"])


def test_ground_truth_only_gets_punctuation_when_annotators_disagree() -> None:
    # vqaEval.py leaves unanimous ground truth untouched and never maps its number words.
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("red white", ["red,white"] * 5 + ["red"] * 5) == 1.0


def test_vqa_score_reports_percent_per_answer_type() -> None:
    gts = {"q1": ["yes"] * 10, "q2": ["2"] * 3 + ["3"] * 7, "q3": ["cat"] + ["dog"] * 9}
    predictions = {"q1": "Yes", "q2": "two", "q3": "cat"}
    types = {"q1": "yes/no", "q2": "number", "q3": "other"}
    result = vqa_score(predictions, gts, types)
    assert result["n"] == 3
    assert result["vqa_accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.3) / 3)
    assert result["per_type"] == pytest.approx({"yes/no": 100.0, "number": 90.0, "other": 30.0})
    assert vqa_score(predictions, gts)["per_type"] == {}


def test_vqa_score_rejects_unknown_questions() -> None:
    with pytest.raises(KeyError, match="no ground truth"):
        vqa_score({"q9": "yes"}, {"q1": ["yes", "yes"]})
    with pytest.raises(KeyError, match="no answer type"):
        vqa_score({"q1": "yes"}, {"q1": ["yes", "yes"]}, {})
    with pytest.raises(ValueError, match="no predictions"):
        vqa_score({}, {"q1": ["yes", "yes"]})


def test_exact_match_normalizes_both_sides() -> None:
    gts = {"v1": ["The Dog"], "v2": ["two"], "v3": ["cat"], "v4": ["red", "blue"]}
    predictions = {"v1": "dog.", "v2": "2", "v3": "bird", "v4": "Blue"}
    assert exact_match(predictions, gts) == pytest.approx(75.0)


# --- captions ----------------------------------------------------------------------------------

REFERENCES = {
    "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave."],
    "2": ["A plate of food with broccoli and rice.", "Rice and vegetables on a white plate."],
    "3": ["Two dogs playing with a frisbee in the park.", "Dogs chase a frisbee on the grass."],
}
PERFECT = {key: captions[0] for key, captions in REFERENCES.items()}
WRONG = {"1": "A cat sitting on a couch.", "2": "A plate of rice.", "3": "Dogs in a park."}


@needs_java
def test_perfect_captions_score_top_marks_with_official_pipeline() -> None:
    metrics = caption_metrics(PERFECT, REFERENCES)
    assert list(metrics) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert metrics["BLEU-4"] == pytest.approx(100.0, abs=1e-3)
    assert metrics["METEOR"] == pytest.approx(100.0, abs=1e-3)
    assert metrics["ROUGE-L"] == pytest.approx(100.0)
    assert metrics["CIDEr"] > 100.0


@needs_java
def test_wrong_captions_score_lower() -> None:
    perfect = caption_metrics(PERFECT, REFERENCES, meteor=False)
    wrong = caption_metrics(WRONG, REFERENCES, meteor=False)
    assert "METEOR" not in wrong
    assert wrong["CIDEr"] < perfect["CIDEr"] / 2
    assert wrong["BLEU-1"] < perfect["BLEU-1"]
    assert wrong["ROUGE-L"] < perfect["ROUGE-L"]


@needs_java
def test_concurrent_runs_do_not_share_tokenizer_files() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(
            pool.map(lambda p: caption_metrics(p, REFERENCES, meteor=False), [PERFECT, WRONG] * 2)
        )
    assert runs[0] == runs[2] and runs[1] == runs[3]
    assert runs[0] != runs[1]


@needs_java
def test_python_tokenizer_agrees_with_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs' toys, a cat's bowl and a child's bike.",
        "A black-and-white photo of people who don't know.",
        'It\'s 3.5 feet tall! He said "hello" to the U.S. team.',
        "A dog (brown) runs -- fast... There's a cat; it's on the mat: yes?",
        "They're here, we'll go, I'd say I'm done, I can't, cannot.",
        "Mr. Smith's 1,000 dollar bill, a 10-year-old boy, e.g. this.",
    ]
    official = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert _ptb_like_tokenize(caption) == official[str(i)][0]


def test_without_java_meteor_is_skipped_and_python_tokenizer_used(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not java_available()
    with pytest.warns(UserWarning, match="java not found"):
        metrics = caption_metrics(PERFECT, REFERENCES)
    assert list(metrics) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert metrics["BLEU-4"] == pytest.approx(100.0, abs=1e-3)
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        caption_metrics(PERFECT, REFERENCES, meteor=True)


def test_caption_metrics_rejects_bad_input() -> None:
    with pytest.raises(KeyError, match="no reference captions"):
        caption_metrics({"4": "a dog"}, REFERENCES)
    with pytest.raises(ValueError, match="empty reference list"):
        caption_metrics({"1": "a dog"}, {"1": []})
    with pytest.raises(ValueError, match="no predicted captions"):
        caption_metrics({}, REFERENCES)


# --- classification ----------------------------------------------------------------------------


def test_accuracy_from_logits_and_from_class_ids() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, np.array([0, 0, 0])) == pytest.approx(200 / 3)
    assert accuracy(np.array([1, 1, 0, 2]), np.array([1, 0, 0, 2])) == 75.0
    with pytest.raises(ValueError, match="2 labels"):
        accuracy(logits, np.array([0, 1]))


def test_f1_macro_and_micro_by_hand() -> None:
    probabilities = np.array(
        [[0.9, 0.2, 0.1], [0.6, 0.7, 0.3], [0.1, 0.8, 0.4], [0.3, 0.4, 0.5]]
    )  # 0.5 is not above the threshold
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    # label 0: tp 1, fp 1, fn 1 -> 0.5; label 1: tp 2 -> 1.0; label 2: nothing at all -> 0.
    # micro: tp 3, fp 1, fn 1 -> 6 / 8.
    scores = f1_scores(probabilities, targets)
    assert scores["f1_macro"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)
    assert scores["f1_micro"] == pytest.approx(75.0)
    lower_threshold = f1_scores(probabilities, targets, threshold=0.45)
    # At 0.45 the 0.5 on label 2 becomes a false positive: micro 6 / (6 + 2 + 1).
    assert lower_threshold["f1_micro"] == pytest.approx(100 * 6 / 9)


def test_f1_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match="same \\[N, C\\] shape"):
        f1_scores(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="multi-hot"):
        f1_scores(np.zeros((1, 2)), np.array([[0, 2]]))


def test_one_answer_video_qa_is_scored_by_exact_match() -> None:
    """MSRVTT-QA / MSVD-QA give one answer per question: VQA's leave-one-out accuracy is undefined
    there, so the trainer's VQA metrics are exact match alone."""
    from trainer.methods.text import vqa_or_caption_metrics

    records = [{"key": "video7", "qid": str(i), "prediction": p, "answers": [a], "answer_type": "what"}
               for i, (p, a) in enumerate([("Man", "man"), ("dog", "cat"), ("two", "2"), ("a ball", "ball")])]
    metrics = vqa_or_caption_metrics("vqa", records)
    assert metrics == {"exact_match": pytest.approx(75.0)}
