"""Text in and out of the frozen language models: prompts, answers, and tokenised batches.

Shared by every method that puts a frozen causal LM behind a visual input (eP-ALM's OPT,
Prismer's RoBERTa decoder), so a VQA question reads the same way to both and their numbers compare.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from trainer.eval import caption_metrics, exact_match, vqa_score

IGNORE_INDEX = -100


def vqa_prompt(question: str) -> str:
    return f"question: {question} answer:"


def training_answer(question: dict[str, Any]) -> str:
    """VQAv2's `multiple_choice_answer` when present, else the most frequent of the ten answers."""
    return question.get("multiple_choice_answer") or Counter(question["answers"]).most_common(1)[0][0]


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str] | None, max_length: int = 64
) -> dict[str, Tensor]:
    """Tokenise `bos + prompt (+ target + eos)` per row, left-padded so every row ends at the last column.

    Returns input_ids and attention_mask, plus labels when `targets` is given: the target tokens and
    eos, -100 on bos, prompt and padding, so the loss covers the answer only. Targets are used as
    given (VQA: prompt "question: {q} answer:", target " {a}"; captioning: prompt "" or a prefix).
    Rows longer than `max_length` lose target tokens from the right; a prompt that leaves no room
    for a target (or, without targets, does not fit) is an error rather than a silent cut.
    """
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    for name, token_id in special.items():
        if token_id is None:
            raise ValueError(f"the tokenizer has no {name} token; encode_batch needs bos, eos and pad")

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if targets is not None else None
    rows, label_rows = [], []
    for index, ids in enumerate(prompt_ids):
        ids = [special["bos"], *ids]
        room = max_length - len(ids)
        if room < (1 if targets is not None else 0):
            raise ValueError(f"prompt {index} takes {len(ids)} tokens with bos, max_length={max_length}: no room left")
        labels = [IGNORE_INDEX] * len(ids)
        if target_ids is not None:
            target = [*target_ids[index], special["eos"]][:room]
            ids, labels = ids + target, labels + target
        rows.append(ids)
        label_rows.append(labels)

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), special["pad"], dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for index, (ids, row_labels) in enumerate(zip(rows, label_rows)):
        input_ids[index, width - len(ids) :] = torch.tensor(ids)
        attention_mask[index, width - len(ids) :] = 1
        labels[index, width - len(ids) :] = torch.tensor(row_labels)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if targets is not None:
        batch["labels"] = labels
    return batch


def vqa_or_caption_metrics(task: str, predictions: list[dict[str, Any]]) -> dict[str, float]:
    """The paper metrics over `predict` records: official VQA accuracy (overall and per answer type)
    and exact match for task "vqa" (records: key, qid, prediction, answers, answer_type), COCO
    caption scores for "caption" (records: key, prediction, references). Exact match is the only
    metric of one-answer datasets (MSRVTT-QA, MSVD-QA), where VQA's leave-one-out accuracy is undefined."""
    if task == "vqa":
        ids = [f"{p['key']}#{p['qid']}" for p in predictions]
        answers = {i: p["answers"] for i, p in zip(ids, predictions)}
        predicted = {i: p["prediction"] for i, p in zip(ids, predictions)}
        metrics = {"exact_match": exact_match(predicted, answers)}
        if all(len(gts) >= 2 for gts in answers.values()):
            score = vqa_score(predicted, answers, {i: p["answer_type"] for i, p in zip(ids, predictions)})
            metrics.update({"vqa_accuracy": score["vqa_accuracy"], **{f"vqa_accuracy/{t}": v for t, v in score["per_type"].items()}})
        return metrics
    return caption_metrics({p["key"]: p["prediction"] for p in predictions}, {p["key"]: p["references"] for p in predictions})
