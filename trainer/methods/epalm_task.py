"""eP-ALM on the cache: cached [CLS] stacks + VQA / captioning annotations -> a trained adaptor.

The model is in `epalm.py`; this file is what the shared loop needs around it: which feature to
read (`model.feature`, default `vit-cls`), how annotations become examples, and the paper's
metrics (official VQA accuracy for open-ended answers; BLEU/CIDEr for captions).

`model.*` config keys are `EPALMOptions`' fields: the model's (`EPALMConfig`) and the task's
(`trainer config --method epalm` lists them). With `views` each epoch trains every example on one
of its sample's clean [CLS] stack and cached augmented views, a seeded draw per sample and epoch
(trainer/data.py); evaluation reads the clean one.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from cache_schema import SplitReader, model_revision
from trainer.config import Positive, PositiveFloat
from trainer.methods.base import Method, MethodError, load_frozen
from trainer.methods.epalm import EPALM, EPALMConfig, load_lm
from trainer.methods.text import encode_batch, training_answer, vqa_or_caption_metrics, vqa_prompt


class EPALMOptions(EPALMConfig):
    """`model.*` of `trainer fit --method epalm`: the model's config and what the task adds."""

    visual_dim: Positive | None = Field(None, description="width of the cached [CLS] tokens; null: the cache's "
                                                          "(another value is refused)")
    task: Literal["vqa", "caption"] = Field("vqa", description="vqa (open-ended answers, VQA accuracy) | caption "
                                                               "(CIDEr, BLEU)")
    feature: str = Field("vit-cls", description="the cached feature whose [CLS] stacks the LM reads")
    blind: bool = Field(False, description="train and evaluate with no visual token: the same LM and prompt, blind")
    num_beams: Positive = Field(3, description="beam search width when generating")
    max_new_tokens: Positive | None = Field(None, description="most tokens generated; null: 10 for vqa, 24 for caption")
    max_length: Positive = Field(64, description="tokens per example (prompt + target), longer ones are cut")
    caption_prompt: str = Field("", description="the text a caption is generated after")
    views: bool = Field(False, description="train on the feature's cached augmented views too (--expert-opt views=V): "
                                           "each epoch, per sample, one of the clean [CLS] stack and its V views, "
                                           "a seeded draw; evaluation reads the clean one")
    prompt_lr: PositiveFloat | None = Field(None, description="a fixed learning rate for the soft prompt (no warmup, "
                                                              "no decay; the paper: 1e-5 beside the rest's 2e-5 peak); "
                                                              "null: the run's lr and schedule")
    adapter_lr: PositiveFloat | None = Field(None, description="a fixed learning rate for the adapters (the paper: "
                                                               "1e-5); null: the run's lr and schedule")

    @model_validator(mode="after")
    def derive_lengths(self) -> EPALMOptions:
        if self.max_new_tokens is None:
            self.max_new_tokens = 10 if self.task == "vqa" else 24
        return self

    def config_for_model(self, visual_dim: int) -> EPALMConfig:
        """The model's config: these options with the cache's [CLS] width."""
        return EPALMConfig(**self.model_dump(include=set(EPALMConfig.model_fields)) | {"visual_dim": visual_dim})


class EPALMMethod(Method):
    name = "epalm"
    Options = EPALMOptions
    options: EPALMOptions

    def __init__(self, config):
        super().__init__(config)
        lm, revision = self.options.lm, self.options.lm_revision
        self.tokenizer = load_frozen("model.lm", lm, lambda: AutoTokenizer.from_pretrained(lm, revision=revision), revision)
        self.tokenizer.padding_side = "left"

    def feature_fields(self) -> dict[str, str]:
        return {"visual": f"{self.options.feature}/cls"}

    def view_fields(self) -> dict[str, str]:
        return {"visual": self.options.feature} if self.options.views else {}

    def check_cache(self, reader: SplitReader) -> None:
        spec = reader.spec(self.options.feature)
        levels, width = spec.array("cls").shape
        problems = []
        if self.options.visual_dim not in (None, width):
            problems.append(f"model.visual_dim={self.options.visual_dim} but the cached [CLS] tokens are {width}-d")
        if self.options.num_levels > levels:
            problems.append(f"model.num_levels={self.options.num_levels} but the cache holds {levels} levels")
        if problems:
            raise MethodError(
                f"epalm: cached feature {self.options.feature!r} (model {spec.model_id}, layers "
                f"{spec.params.get('layers')}) does not fit the config: " + "; ".join(problems)
            )

    def build_model(self, reader: SplitReader) -> nn.Module:
        config = self.options.config_for_model(visual_dim=reader.spec(self.options.feature).array("cls").shape[1])
        try:
            lm = load_frozen("model.lm", config.lm, lambda: load_lm(config.lm, config.lm_revision), config.lm_revision)
            return EPALM(config, lm)
        except ValueError as e:
            raise MethodError(f"epalm: {e}") from e

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The connections at the run's lr and schedule; with `prompt_lr` / `adapter_lr`, the soft
        prompt / the adapters in groups of their own at that rate, held fixed (`fixed_lr`), as the
        paper trains them (1e-5 fixed beside 2e-5 warmed up and decayed for the rest)."""
        fixed = {"soft_prompt.": self.options.prompt_lr, "attention_adapters.": self.options.adapter_lr,
                 "ffn_adapters.": self.options.adapter_lr}
        groups: dict[float | None, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                lr = next((lr for prefix, lr in fixed.items() if name.startswith(prefix)), None)
                groups.setdefault(lr, []).append(param)
        return [{"params": params, "lr": self.config.lr if lr is None else lr, "fixed_lr": lr is not None}
                for lr, params in groups.items()]

    def expand(self, annotations: dict[str, Any], train: bool) -> list[dict[str, Any]]:
        if self.options.task == "vqa":
            examples = []
            for index, question in enumerate(annotations.get("questions", [])):
                example = {"prompt": vqa_prompt(question["question"]), "qid": str(question.get("question_id", index)),
                           "answers": question.get("answers", []), "answer_type": question.get("answer_type", "")}
                if train:
                    example["target"] = " " + training_answer(question)
                examples.append(example)
        else:
            captions = annotations.get("captions", [])
            prompt = self.options.caption_prompt
            if not train:
                return [{"prompt": prompt, "references": captions}] if captions else []
            examples = [{"prompt": prompt, "target": " " + c} for c in captions]
        return examples

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        targets = [item["target"] for item in items] if all("target" in item for item in items) else None
        batch = encode_batch(self.tokenizer, [item["prompt"] for item in items], targets, self.options.max_length)
        batch["visual"] = torch.stack([torch.from_numpy(item["visual"]).float() for item in items])
        batch["items"] = [{k: v for k, v in item.items() if k != "visual"} for item in items]
        return batch

    def _visual(self, model: EPALM, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.options.blind:
            return None
        # the deepest `num_levels` of the cached levels (the cache may hold more than the model reads)
        return batch["visual"][:, -model.config.num_levels :].to(model.lm.device)

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
                                       self._visual(model, batch), max_new_tokens=self.options.max_new_tokens,
                                       num_beams=self.options.num_beams)
            for item, tokens in zip(batch["items"], generated):
                predictions.append({**item, "prediction": self.tokenizer.decode(tokens, skip_special_tokens=True).strip()})
        return predictions

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        if not predictions:
            raise MethodError("epalm: the evaluation split has no examples for this task")
        return vqa_or_caption_metrics(self.options.task, predictions)

    def backbones(self) -> dict[str, dict[str, str]]:
        model_id, revision = model_revision(self.options.lm, self.options.lm_revision)
        return {"lm": {"id": model_id, "revision": revision}}
