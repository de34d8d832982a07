"""MoPE on the cache: the main modality's cached input + the other's cached embedding -> class.

The model is in `mope.py`; this file is what the shared loop needs around it. Everything comes
from the cache: the main input (`rgb` at the encoder's resolution, or `text-tokens`), the
complementary embedding (`text-cls`, or `image-pooled` when the text is the main modality), and
each sample's `label` annotation, with the class names from the source's record in the cache.

`model.*` config keys are `MoPEOptions`' fields (`trainer config --method mope` lists them):
which modality is the main one and its frozen encoder, the cached features read, and the prompts
(`PromptConfig`); the classes and the complementary embedding's width come from the cache.

Metrics: accuracy for single-label sources (Food-101, SNLI-VE, shapes), F1 macro and micro at
sigmoid > 0.5 for multi-label ones (MM-IMDB); with dynamic prompts also the routing entropy and
each expert's importance, and OUT/importance.png, expert importance over training.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader

from cache_schema import VIEWS_ARRAY, SplitReader, load_timm_model, model_revision
from trainer.config import describe
from trainer.eval.classification import accuracy, f1_scores
from trainer.methods.base import Method, MethodError, check_model_ref, load_frozen
from trainer.methods.mope import MoPE, MoPEConfig, PromptConfig, prompted_encoder, routing_statistics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODALITIES = {  # main modality -> (default encoder, main feature, default complementary feature)
    "image": ("swin_base_patch4_window7_224", "rgb", "text-cls"),
    "text": ("bert-base-uncased", "text-tokens", "image-pooled"),
}


class MoPEOptions(PromptConfig):
    """`model.*` of `trainer fit --method mope`. `encoder`, `main_feature` and `complementary` left
    out take the modality's defaults (listed here for image); `complementary: null` is none at all
    (single-modality prompt tuning)."""

    modality: Literal["image", "text"] = Field("image", description="which encoder is prompted: image | text")
    encoder: str = Field(MODALITIES["image"][0], description="the frozen main encoder: a timm name or save_for_hf "
                                                             f"directory (image); hub id or directory (text: "
                                                             f"{MODALITIES['text'][0]})")
    encoder_revision: str | None = Field(None, description="hub revision of encoder; null: its default branch")
    main_feature: str = Field(MODALITIES["image"][1], description=f"the cached main input (text: {MODALITIES['text'][1]})")
    complementary: str | None = Field(MODALITIES["image"][2], description="the cached embedding of the other modality "
                                      f"(text: {MODALITIES['text'][2]}); null: none (single-modality prompt tuning)")
    views: bool = Field(False, description="train on the complementary embedding's cached augmented views too "
                                           "(image-pooled --expert-opt views=V): each epoch, per sample, one of the "
                                           "clean embedding and its V views, a seeded draw; evaluation reads the clean one")

    @model_validator(mode="before")
    @classmethod
    def modality_defaults(cls, data: Any) -> Any:
        """The keys left out take the defaults of the modality given (a bad one is the Literal's to refuse)."""
        if isinstance(data, dict) and data.get("modality") in MODALITIES:
            defaults = dict(zip(("encoder", "main_feature", "complementary"), MODALITIES[data["modality"]]))
            return defaults | data
        return data

    @model_validator(mode="after")
    def views_need_a_complementary(self) -> MoPEOptions:
        if self.views and self.complementary is None:
            raise ValueError("views=true reads the complementary embedding's cached views, but complementary is null")
        return self

    def config_for_model(self, num_classes: int, multi_label: bool, complementary_dim: int | None) -> MoPEConfig:
        """The model's config: these prompts with what the cache decides."""
        return MoPEConfig(**self.model_dump(include=set(PromptConfig.model_fields)), num_classes=num_classes,
                          multi_label=multi_label, complementary_dim=complementary_dim)


class MoPEMethod(Method):
    name = "mope"
    Options = MoPEOptions
    options: MoPEOptions

    def __init__(self, config):
        super().__init__(config)
        self.modality = self.options.modality
        self.encoder_ref, self.encoder_revision = self.options.encoder, self.options.encoder_revision
        check_model_ref("model.encoder", self.encoder_ref, self.encoder_revision, timm_name=self.modality == "image")
        self.main_feature, self.complementary = self.options.main_feature, self.options.complementary
        self.classes: list[str] = []
        self.multi_label = False

    # ---- what the cache must hold ----------------------------------------------------------------

    def feature_fields(self) -> dict[str, str]:
        if self.modality == "image":
            fields_ = {"pixel_values": f"{self.main_feature}/rgb"}
        else:
            fields_ = {"input_ids": f"{self.main_feature}/input_ids", "attention_mask": f"{self.main_feature}/attention_mask"}
        if self.complementary:
            fields_["complementary"] = f"{self.complementary}/{self.complementary_array}"
        return fields_

    def view_fields(self) -> dict[str, str]:
        return {"complementary": self.complementary} if self.options.views else {}

    def check_cache(self, reader: SplitReader) -> None:
        have = reader.feature_names
        for name in [self.main_feature, self.complementary]:
            if name and name not in have:
                raise MethodError(f"mope: the cache has no {name!r} feature for {reader.source}/{reader.split} "
                                  f"(it has: {', '.join(have) or 'none'}); precompute it with `--expert {name}`")
        if self.complementary:
            arrays = [array for array in reader.spec(self.complementary).arrays if array.name != VIEWS_ARRAY]
            if len(arrays) != 1 or len(arrays[0].shape) != 1:
                raise MethodError(f"mope: model.complementary={self.complementary!r} must hold one embedding per sample "
                                  f"([D]); it holds {[(a.name, a.shape) for a in arrays]}")
            self.complementary_array = arrays[0].name
        main = reader.spec(self.main_feature)
        if self.modality == "text" and main.model_id != self.encoder_provenance[0]:
            raise MethodError(f"mope: the cached {self.main_feature!r} tokens come from {main.model_id}'s tokenizer, "
                              f"but model.encoder is {self.encoder_ref}: tokenize with the encoder's own tokenizer")

    def derive_state(self, train_reader: SplitReader) -> dict[str, Any]:
        info = train_reader.header.get("source_info") or {}
        if not info.get("classes"):
            raise MethodError(f"mope: source {train_reader.source!r} records no classes; MoPE trains on a "
                              f"classification source (food101, mmimdb, snli-ve, shapes)")
        return {"classes": list(info["classes"]), "multi_label": bool(info.get("multi_label", False))}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.classes, self.multi_label = state["classes"], state["multi_label"]

    # ---- model -----------------------------------------------------------------------------------

    def _load_encoder(self) -> nn.Module:
        if self.modality == "image":
            return load_frozen("model.encoder", self.encoder_ref, lambda: load_timm_model(self.encoder_ref), timm_name=True)
        from transformers import AutoModel

        return load_frozen("model.encoder", self.encoder_ref,
                           lambda: AutoModel.from_pretrained(self.encoder_ref, revision=self.encoder_revision),
                           self.encoder_revision)

    def build_model(self, reader: SplitReader) -> nn.Module:
        encoder = self._load_encoder().eval()
        complementary_dim = (reader.spec(self.complementary).array(self.complementary_array).shape[0]
                             if self.complementary else None)
        try:
            config = self.options.config_for_model(len(self.classes), self.multi_label, complementary_dim)
        except ValidationError as e:
            raise MethodError(f"mope: {describe(e)}") from None
        try:
            model = MoPE(config, prompted_encoder(encoder))
        except ValueError as e:
            raise MethodError(f"mope: {e}") from e
        if self.modality == "image":
            data_config = encoder.pretrained_cfg
            self.image_size = tuple(data_config["input_size"][1:])
            self.pixel_mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
            self.pixel_std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        return model

    @cached_property
    def encoder_provenance(self) -> tuple[str, str]:
        """(id, revision) of the frozen encoder; for a local directory that digests its weights, so once per run."""
        return model_revision(self.encoder_ref, self.encoder_revision)

    def backbones(self) -> dict[str, dict[str, str]]:
        model_id, revision = self.encoder_provenance
        return {"encoder": {"id": model_id, "revision": revision}}

    # ---- data ------------------------------------------------------------------------------------

    def expand(self, annotations: dict[str, Any], train: bool) -> list[dict[str, Any]]:
        label = annotations.get("label")
        return [] if label is None else [{"label": label}]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self.modality == "image":
            pixels = torch.from_numpy(np.stack([item["pixel_values"] for item in items])).float() / 255
            if pixels.shape[-2:] != self.image_size:
                pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
            inputs = {"pixel_values": (pixels - self.pixel_mean) / self.pixel_std}
        else:
            attention_mask = torch.from_numpy(np.stack([item["attention_mask"] for item in items])).long()
            longest = int(attention_mask.sum(dim=1).max())
            input_ids = torch.from_numpy(np.stack([item["input_ids"] for item in items])).long()
            inputs = {"input_ids": input_ids[:, :longest], "attention_mask": attention_mask[:, :longest]}
        if self.multi_label:
            labels = torch.zeros(len(items), len(self.classes))
            for row, item in enumerate(items):
                labels[row, item["label"]] = 1.0
        else:
            labels = torch.tensor([item["label"] for item in items])
        batch = {"inputs": inputs, "labels": labels,
                 "items": [{"key": item["key"], "label": item["label"]} for item in items]}
        if self.complementary:
            batch["complementary"] = torch.from_numpy(np.stack([item["complementary"] for item in items])).float()
        return batch

    def _forward(self, model: MoPE, batch: dict[str, Any], labels: bool):
        device = model.head.weight.device
        complementary = batch.get("complementary")
        return model({k: v.to(device) for k, v in batch["inputs"].items()},
                     None if complementary is None else complementary.to(device),
                     batch["labels"].to(device) if labels else None)

    # ---- training and scoring --------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._forward(model, batch, labels=True).loss

    def predict(self, model: nn.Module, loader: DataLoader) -> list[dict[str, Any]]:
        return self._predict(model, loader)[0]

    def evaluate(self, model: nn.Module, loader: DataLoader) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """`score`'s metrics and the routing statistics over the whole split (entropy, each expert's
        importance and its spread), which no per-example record carries."""
        predictions, routing = self._predict(model, loader)
        return {**self.score(predictions), **routing}, predictions

    def _predict(self, model: nn.Module, loader: DataLoader) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The records, and the routing statistics over all of them ({} without dynamic prompts)."""
        predictions, routing = [], []
        for batch in loader:
            output = self._forward(model, batch, labels=False)
            if output.routing:
                routing.append(torch.stack(output.routing).cpu())  # [layers, B, k]
            logits = output.logits.float().cpu()
            for item, row in zip(batch["items"], logits):
                if self.multi_label:
                    probabilities = row.sigmoid()
                    record = {"prediction": [i for i, p in enumerate(probabilities.tolist()) if p > 0.5],
                              "probabilities": [round(p, 4) for p in probabilities.tolist()]}
                else:
                    record = {"prediction": int(row.argmax())}
                predictions.append({**item, **record, "prediction_names": self._names(record["prediction"])})
        return predictions, routing_statistics(list(torch.cat(routing, dim=1))) if routing else {}

    def _names(self, prediction: int | list[int]) -> str | list[str]:
        return [self.classes[i] for i in prediction] if isinstance(prediction, list) else self.classes[prediction]

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        if not predictions:
            raise MethodError("mope: the evaluation split has no labelled samples")
        if self.multi_label:
            targets = np.zeros((len(predictions), len(self.classes)))
            for row, record in enumerate(predictions):
                targets[row, record["label"]] = 1
            metrics: dict[str, Any] = f1_scores(np.array([r["probabilities"] for r in predictions]), targets)
        else:
            metrics = {"accuracy": accuracy(np.array([r["prediction"] for r in predictions]),
                                            np.array([r["label"] for r in predictions]))}
        return metrics

    def figures(self, history: list[dict[str, Any]]) -> dict[str, Figure]:
        """`importance` (OUT/importance.png): each expert's share of the routing mass at every evaluation."""
        points = [(record["step"], record["eval"]) for record in history if "expert_importance" in record["eval"]]
        if not points:
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [step for step, _ in points]
        shares = np.array([metrics["expert_importance"] for _, metrics in points])  # [evals, k]
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
        colors = plt.get_cmap("tab20")
        for expert in range(shares.shape[1]):
            top.plot(steps, shares[:, expert], marker="o", markersize=3, linewidth=1, color=colors(expert % 20), label=f"E{expert}")
        top.axhline(1 / shares.shape[1], color="grey", linestyle="--", linewidth=1, label="uniform")
        top.set_ylabel("share of routing mass")
        top.set_title(f"MoPE expert importance ({shares.shape[1]} experts, mean over layers)")
        top.legend(ncol=2, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        bottom.plot(steps, [metrics["routing_entropy"] for _, metrics in points], color="black", marker="o", markersize=3)
        bottom.axhline(points[0][1]["routing_entropy_max"], color="grey", linestyle="--", linewidth=1)
        bottom.set_ylabel("routing entropy")
        bottom.set_xlabel("step")
        figure.tight_layout()
        return {"importance": figure}
