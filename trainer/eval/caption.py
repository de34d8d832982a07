"""Captioning metrics as the COCO caption evaluation computes them (pycocoevalcap 1.2).

Captions are tokenised with Stanford's PTBTokenizer (Java), then scored with BLEU-1..4, METEOR
(Java), ROUGE-L and CIDEr(-D). SPICE is left out on purpose: its first run downloads Stanford
CoreNLP models, which cannot work offline.

Java: `java` on PATH gives the official numbers. Without it METEOR is skipped and captions are
tokenised by `_ptb_like_tokenize`, a small Python stand-in that agrees with PTBTokenizer on
ordinary English captions (lower-case, clitics split, punctuation dropped) but is not it; a
warning says so.

Concurrency: PTBTokenizer writes its input to a `NamedTemporaryFile` inside the installed
pycocoevalcap package (unique name, removed afterwards), and METEOR starts its own Java process
per scorer talking over pipes, so two processes or threads can evaluate at the same time. The
package directory must be writable.

CIDEr weighs n-grams by document frequency over the references of the images being scored, so it
depends on the evaluated set: a single image always scores 0.
"""

from __future__ import annotations

import re
import shutil
import warnings

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

# Words with inner hyphens, periods, apostrophes or digit commas stay whole ("black-and-white",
# "3.5", "u.s.", "1,000"); anything else that is not a space is its own token.
_TOKEN = re.compile(r"[a-z0-9]+(?:(?:[-.']|(?<=\d),(?=\d))[a-z0-9]+)*\.?|\S")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "wanna": ["wan", "na"],
    "gotta": ["got", "ta"],
}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "mt", "inc", "co"}
_SYMBOLS = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''",
}


def java_available() -> bool:
    return shutil.which("java") is not None


def _ptb_like_tokenize(caption: str) -> str:
    """PTBTokenizer `-lowerCase` output, minus pycocoevalcap's PUNCTUATIONS, for plain captions.

    A word-final period stays on abbreviations ("u.s.", "mr."), as PTB keeps it there. Bracket
    tokens stay too, as in the official pipeline: its punctuation list spells them upper-case while
    the tokenizer emits them lower-case.
    """
    words = []
    for token in _TOKEN.findall(caption.lower()):
        stem = token[:-1]
        if token.endswith(".") and stem and "." not in stem and stem not in _ABBREVIATIONS:
            words += [stem, "."]
        else:
            words.append(token)
    tokens = []
    for word in words:
        clitic = _CLITIC.match(word)
        tokens += clitic.groups() if clitic else _SPLIT_WORDS.get(word, [_SYMBOLS.get(word, word)])
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


def _tokenize(captions: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    if java_available():
        return PTBTokenizer().tokenize(
            {key: [{"caption": text} for text in texts] for key, texts in captions.items()}
        )
    warnings.warn(
        "java not found on PATH: captions are tokenised by a Python stand-in for PTBTokenizer, "
        "so scores can differ slightly from the official COCO evaluation",
        stacklevel=3,
    )
    return {key: [_ptb_like_tokenize(text) for text in texts] for key, texts in captions.items()}


def caption_metrics(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    meteor: bool | None = None,
) -> dict[str, float]:
    """BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr in percent for one generated caption per image.

    Scores exactly the images in `predictions`, like the COCO evaluation scores the images of its
    result file; `references` may hold more. `meteor=None` computes METEOR when Java is there.
    """
    if not predictions:
        raise ValueError("no predicted captions to score")
    missing = [key for key in predictions if key not in references]
    if missing:
        raise KeyError(
            f"{len(missing)} predicted image ids have no reference captions, e.g. {missing[:5]}"
        )
    empty = [key for key in predictions if not references[key]]
    if empty:
        raise ValueError(f"{len(empty)} images have an empty reference list, e.g. {empty[:5]}")
    if meteor is None:
        meteor = java_available()
    elif meteor and not java_available():
        raise RuntimeError("METEOR needs Java: no `java` on PATH (pass meteor=False to skip it)")

    # One tokenizer run for both sides: each run starts a JVM.
    tokenized = _tokenize(
        {("ref", key): list(references[key]) for key in predictions}
        | {("hyp", key): [caption] for key, caption in predictions.items()}
    )
    refs = {key: tokenized["ref", key] for key in predictions}
    hyps = {key: tokenized["hyp", key] for key in predictions}

    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    metrics = {f"BLEU-{n}": 100.0 * score for n, score in enumerate(bleu, start=1)}
    if meteor:
        metrics["METEOR"] = 100.0 * float(Meteor().compute_score(refs, hyps)[0])
    metrics["ROUGE-L"] = 100.0 * float(Rouge().compute_score(refs, hyps)[0])
    metrics["CIDEr"] = 100.0 * float(Cider().compute_score(refs, hyps)[0])
    return metrics
