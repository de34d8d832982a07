"""Metrics as the papers report them: official VQA accuracy, COCO caption scores, accuracy, F1."""

from trainer.eval.caption import caption_metrics, java_available
from trainer.eval.classification import accuracy, f1_scores
from trainer.eval.vqa import exact_match, normalize_answer, vqa_accuracy, vqa_score

__all__ = [
    "accuracy",
    "caption_metrics",
    "exact_match",
    "f1_scores",
    "java_available",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_score",
]
