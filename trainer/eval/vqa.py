"""The official VQA accuracy, reproduced from the VQA API's `vqaEval.py` (GT-Vision-Lab/VQA).

Published VQAv2 numbers come from that script, so this file copies its behaviour, quirks included,
rather than improving on it:

- The prediction is normalised: punctuation (`_PUNCT`, `_PERIOD_STRIP`, `_COMMA_STRIP`), lower-case,
  number words -> digits (`_MANUAL_MAP`), articles dropped, contractions fixed (`_CONTRACTIONS`).
- Ground-truth answers only get the punctuation step, and only when the annotators disagree. The
  VQA annotations were normalised when they were collected; a ground truth of "Two" therefore never
  matches, while a prediction of "Two" matches "2".
- Accuracy for one question: for each annotator, leave that annotator out and score
  min(#other annotators who gave the prediction / 3, 1); average over the annotators.

Official results round to two decimals; these functions return unrounded percentages.
"""

from __future__ import annotations

import re

# The official table, verbatim (including its odd entries such as "somebody'd" -> "somebodyd", and
# the capitalised keys that can never match because the text is lower-cased first).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PUNCT = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)  # fmt: skip
# "(?!<=\d)" was meant as a look-behind but is a look-ahead that always succeeds before a "."; the
# effect is "drop every period not followed by a digit" ("2.5" keeps its period, "dog." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
# most re.UNICODE (= 32) periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """`processPunctuation`: a mark next to a space (or any text with a digit,digit comma) is
    deleted, otherwise it becomes a space; the decision looks at the original text."""
    out = text
    for mark in _PUNCT:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower-case, number words -> digits, no articles, fix contractions."""
    words = [_MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """What vqaEval.py does to a predicted answer before comparing it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Official accuracy of one answer, in [0, 1], over however many annotators there are.

    With 10 annotators: 3 or more of the other 9 agreeing gives full credit for that subset.
    Leave-one-out needs at least two answers (with one, no annotator is ever left to agree);
    single-answer datasets should use `exact_match`.
    """
    if len(gt_answers) < 2:
        raise ValueError(
            f"vqa_accuracy needs at least 2 ground-truth answers for its leave-one-out average, "
            f"got {len(gt_answers)}; use exact_match for single-answer datasets"
        )
    answer = normalize_answer(prediction)
    if len(set(gt_answers)) > 1:
        gt_answers = [_process_punctuation(gt) for gt in gt_answers]
    matches = sum(gt == answer for gt in gt_answers)
    # Leaving out a matching annotator leaves matches - 1 agreeing among the others.
    per_subset = [min(1.0, (matches - (gt == answer)) / 3) for gt in gt_answers]
    return sum(per_subset) / len(per_subset)


def _check_keys(predictions: dict[str, str], gts: dict[str, list[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [key for key in predictions if key not in gts]
    if missing:
        raise KeyError(
            f"{len(missing)} predicted question ids have no ground truth, e.g. {missing[:5]}"
        )


def vqa_score(
    predictions: dict[str, str],
    gt_answers: dict[str, list[str]],
    answer_types: dict[str, str] | None = None,
) -> dict:
    """Mean official accuracy over the predicted questions, in percent.

    Scores exactly the questions in `predictions` (ground truth may hold more); `n` says how many,
    so a partial run is visible. `answer_types` (question id -> e.g. "yes/no", "number", "other")
    adds the per-type means the VQA leaderboard reports.
    """
    _check_keys(predictions, gt_answers)
    if answer_types is not None:
        untyped = [key for key in predictions if key not in answer_types]
        if untyped:
            raise KeyError(
                f"{len(untyped)} predicted question ids have no answer type, e.g. {untyped[:5]}"
            )
    scores = {key: vqa_accuracy(answer, gt_answers[key]) for key, answer in predictions.items()}
    by_type: dict[str, list[float]] = {}
    if answer_types is not None:
        for key, score in scores.items():
            by_type.setdefault(answer_types[key], []).append(score)
    return {
        "vqa_accuracy": 100.0 * sum(scores.values()) / len(scores),
        "per_type": {kind: 100.0 * sum(values) / len(values) for kind, values in by_type.items()},
        "n": len(scores),
    }


def exact_match(predictions: dict[str, str], gts: dict[str, list[str]]) -> float:
    """Percent of predictions equal to any of their ground-truth answers, both sides normalised
    with `normalize_answer` (video QA has one answer per question, so no leave-one-out)."""
    _check_keys(predictions, gts)
    hits = sum(
        normalize_answer(answer) in {normalize_answer(gt) for gt in gts[key]}
        for key, answer in predictions.items()
    )
    return 100.0 * hits / len(predictions)
