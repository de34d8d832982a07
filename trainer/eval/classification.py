"""Classification metrics: top-1 accuracy (Food-101, SNLI-VE) and multi-label F1 (MM-IMDB).

Inputs are numpy arrays or anything `np.asarray` takes (lists, CPU tensors). F1 follows
scikit-learn's `f1_score(..., zero_division=0)`: a label nobody has and nobody predicted scores 0
and still counts in the macro mean, so macro F1 on a set where rare genres are absent is lower
than a mean over the present labels would be.
"""

from __future__ import annotations

import numpy as np


def accuracy(logits_or_pred: np.ndarray, labels: np.ndarray) -> float:
    """Percent of samples whose predicted class is the label.

    `logits_or_pred` is [N, C] scores (argmax over C) or [N] predicted class ids.
    """
    scores = np.asarray(logits_or_pred)
    labels = np.asarray(labels)
    predicted = scores.argmax(axis=-1) if scores.ndim == 2 else scores
    if predicted.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"expected [N, C] logits or [N] predictions and [N] labels, got shapes "
            f"{scores.shape} and {labels.shape}"
        )
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    return 100.0 * float(np.mean(predicted == labels))


def f1_scores(
    probabilities: np.ndarray, targets: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Macro and micro F1 in percent for multi-label predictions `probabilities > threshold`.

    `probabilities` are per-label sigmoid outputs [N, C]; `targets` is the multi-hot truth [N, C].
    Macro averages the per-label F1 over all C labels; micro pools true/false positives and false
    negatives over every label first.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    if probabilities.ndim != 2 or probabilities.shape != targets.shape:
        raise ValueError(
            f"expected probabilities and targets of the same [N, C] shape, got "
            f"{probabilities.shape} and {targets.shape}"
        )
    if probabilities.shape[0] == 0:
        raise ValueError("no samples to score")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be multi-hot: every entry 0 or 1")
    predicted = probabilities > threshold
    truth = targets.astype(bool)
    true_pos = (predicted & truth).sum(axis=0)
    false_pos = (predicted & ~truth).sum(axis=0)
    false_neg = (~predicted & truth).sum(axis=0)

    def f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
        denominator = 2 * tp + fp + fn
        zero = np.zeros(denominator.shape)
        return np.divide(2 * tp, denominator, out=zero, where=denominator > 0)

    per_label = f1(true_pos, false_pos, false_neg)
    pooled = f1(*(count.sum(keepdims=True) for count in (true_pos, false_pos, false_neg)))
    return {"f1_macro": 100.0 * float(per_label.mean()), "f1_micro": 100.0 * float(pooled[0])}
