"""eP-ALM on the cache: cached [CLS] stacks + VQA / captioning annotations -> a trained adaptor.

The model is in `epalm.py`; this file is what the shared loop needs around it: which feature to
read (`model.feature`, default `vit-cls`), how annotations become examples, and the paper's
metrics (official VQA accuracy for open-ended answers; BLEU/CIDEr for captions).

`model.*` config keys: every `EPALMConfig` field, plus `task` (vqa | caption), `feature`,
`blind` (train and evaluate with no visual token: the same LM and prompt, blind),
`num_beams` (3), `max_new_tokens`, `max_length`, `caption_prompt` and `views` (train on the
feature's cached augmented views too: each training example appears once with the clean [CLS]
stack and once with each view, so an epoch sees every view once; evaluation reads the clean one).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from cache_schema import SplitReader, model_revision
from trainer.methods.base import Method, MethodError, load_frozen
from trainer.methods.epalm import EPALM, EPALMConfig, load_lm
from trainer.methods.text import encode_batch, training_answer, vqa_or_caption_metrics, vqa_prompt

TASK_KEYS = {"task": "vqa", "feature": "vit-cls", "blind": False, "num_beams": 3, "max_new_tokens": None,
             "max_length": 64, "caption_prompt": "", "views": False}


class EPALMMethod(Method):
    name = "epalm"

    def __init__(self, config):
        super().__init__(config)
        options = dict(config.model)
        self.task = {key: options.pop(key, default) for key, default in TASK_KEYS.items()}
        if self.task["task"] not in ("vqa", "caption"):
            raise MethodError(f"epalm: model.task must be vqa or caption, got {self.task['task']!r}")
        if self.task["max_new_tokens"] is None:
            self.task["max_new_tokens"] = 10 if self.task["task"] == "vqa" else 24
        known = {f.name for f in fields(EPALMConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MethodError(f"epalm: unknown model option(s) {unknown}; known: {sorted(known | set(TASK_KEYS))}")
        if "lm" not in options:
            raise MethodError("epalm: model.lm (the frozen OPT: hub id or local path) is required")
        self.model_options = options
        self.tokenizer = load_frozen("model.lm", options["lm"], lambda: AutoTokenizer.from_pretrained(
            options["lm"], revision=options.get("lm_revision")), options.get("lm_revision"))
        self.tokenizer.padding_side = "left"

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {**{f.name: f.default for f in fields(EPALMConfig)}, "visual_dim": None, **TASK_KEYS}

    def feature_fields(self) -> dict[str, str]:
        arrays = {"visual": f"{self.task['feature']}/cls"}
        if self.task["views"]:
            arrays["views"] = f"{self.task['feature']}/views"
        return arrays

    def check_cache(self, reader: SplitReader) -> None:
        spec = reader.spec(self.task["feature"])
        if self.task["views"]:
            if "views" not in {array.name for array in spec.arrays}:
                raise MethodError(f"epalm: model.views=true, but {reader.source}/{reader.split} caches no augmented "
                                  f"views of {self.task['feature']!r} (precompute it with --expert-opt views=N)")
            self.num_views = spec.array("views").shape[0]
        levels, width = spec.array("cls").shape
        wanted_width = self.model_options.get("visual_dim", width)
        wanted_levels = self.model_options.get("num_levels", 6)
        problems = []
        if wanted_width != width:
            problems.append(f"model.visual_dim={wanted_width} but the cached [CLS] tokens are {width}-d")
        if wanted_levels > levels:
            problems.append(f"model.num_levels={wanted_levels} but the cache holds {levels} levels")
        if problems:
            raise MethodError(
                f"epalm: cached feature {self.task['feature']!r} (model {spec.model_id}, layers "
                f"{spec.params.get('layers')}) does not fit the config: " + "; ".join(problems)
            )

    def build_model(self, reader: SplitReader) -> nn.Module:
        spec = reader.spec(self.task["feature"])
        options = {"visual_dim": spec.array("cls").shape[1], "num_levels": min(6, spec.array("cls").shape[0]),
                   **self.model_options}
        self.cached_levels = spec.array("cls").shape[0]
        try:
            config = EPALMConfig(**options)
            lm = load_frozen("model.lm", config.lm, lambda: load_lm(config.lm, config.lm_revision), config.lm_revision)
            return EPALM(config, lm)
        except ValueError as e:
            raise MethodError(f"epalm: {e}") from e

    def expand(self, annotations: dict[str, Any], train: bool) -> list[dict[str, Any]]:
        if self.task["task"] == "vqa":
            examples = []
            for index, question in enumerate(annotations.get("questions", [])):
                example = {"prompt": vqa_prompt(question["question"]), "qid": str(question.get("question_id", index)),
                           "answers": question.get("answers", []), "answer_type": question.get("answer_type", "")}
                if train:
                    example["target"] = " " + training_answer(question)
                examples.append(example)
        else:
            captions = annotations.get("captions", [])
            prompt = self.task["caption_prompt"]
            if not train:
                return [{"prompt": prompt, "references": captions}] if captions else []
            examples = [{"prompt": prompt, "target": " " + c} for c in captions]
        if train and self.task["views"]:
            return [{**example, "view": view} for view in range(1 + self.num_views) for example in examples]
        return examples

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        targets = [item["target"] for item in items] if all("target" in item for item in items) else None
        batch = encode_batch(self.tokenizer, [item["prompt"] for item in items], targets, self.task["max_length"])
        # view 0 is the clean [CLS] stack, view v > 0 the v-th cached augmented one
        visual = [item["visual"] if item.get("view", 0) == 0 else item["views"][item["view"] - 1] for item in items]
        batch["visual"] = torch.stack([torch.from_numpy(v).float() for v in visual])
        batch["items"] = [{k: v for k, v in item.items() if k not in ("visual", "views")} for item in items]
        return batch

    def _visual(self, model: EPALM, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.task["blind"]:
            return None
        # the deepest `num_levels` of the cached levels (the cache may hold more than the model reads)
        return batch["visual"][:, self.cached_levels - model.config.num_levels :].to(model.lm.device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device = model.lm.device
        output = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), self._visual(model, batch),
                       labels=batch["labels"].to(device))
        return output.loss

    def predict(self, model: nn.Module, loader: DataLoader) -> list[dict[str, Any]]:
        device = model.lm.device
        predictions = []
        for batch in loader:
            generated = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       self._visual(model, batch), max_new_tokens=self.task["max_new_tokens"],
                                       num_beams=self.task["num_beams"])
            for item, tokens in zip(batch["items"], generated):
                predictions.append({**item, "prediction": self.tokenizer.decode(tokens, skip_special_tokens=True).strip()})
        return predictions

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        if not predictions:
            raise MethodError("epalm: the evaluation split has no examples for this task")
        return vqa_or_caption_metrics(self.task["task"], predictions)

    def backbones(self) -> dict[str, dict[str, str]]:
        model_id, revision = model_revision(self.model_options["lm"], self.model_options.get("lm_revision"))
        return {"lm": {"id": model_id, "revision": revision}}
