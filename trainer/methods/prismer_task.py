"""Prismer on the cache: cached RGB + expert labels + VQA / caption annotations -> trained stems,
resampler, adaptors and cross-attention.

The model is in `prismer.py`; this file is what the shared loop needs around it: which cached
features to read, how one sample's labels become model inputs (augmented together with the RGB),
and Prismer's inference and metrics.

Labels, by the expert that cached them (`precompute run --expert prismer` writes them all):

    depth, edge          uint8 [1, R, R]   -> [-1, 1], one channel
    normal               uint8 [3, R, R]   -> [-1, 1], three channels (x mirrored under a flip)
    seg-coco, seg-ade    class ids         -> each pixel's class-name embedding (CACHE/_tables/<expert>)
    objdet               instance ids      -> each instance's class-name embedding (CACHE/_tables/objdet),
                                              plus a random instance embedding in the model
    ocrdet               word ids          -> each word's own embedding (cached per sample)

`model.*` config keys are `PrismerOptions`' fields: the model's (`PrismerConfig`, with `experts`
as cached feature names), the task's and `augment` (`AugmentConfig`); `trainer config --method
prismer` lists them. `shuffle_experts` is a control: every image reads ANOTHER image's expert
labels, a fixed derangement of the split's usable samples seeded by the run's `seed`, the same in
training and evaluation; RGB and questions stay the image's own. `expert_lr` gives the parts that
bring the experts in (stems, resampler, read-outs, instance embeddings) their own learning rate.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from cache_schema import CacheError, SplitReader, load_timm_model, model_revision, read_table
from trainer.augment import AugmentConfig, augment_views
from trainer.config import NonNegative, Positive, PositiveFloat
from trainer.methods.base import Method, MethodError, check_model_ref, load_frozen
from trainer.methods.prismer import EMBEDDING_DIM, NUM_IDS, ExpertInput, Prismer, PrismerConfig, PrismerParts, load_decoder
from trainer.methods.text import encode_batch, training_answer, vqa_or_caption_metrics, vqa_prompt

# expert (as recorded in the cached spec) -> (array read, augmentation kind, channels)
CONTINUOUS_EXPERTS = {"depth": ("depth", "continuous", 1), "normal": ("normal", "normal", 3), "edge": ("edge", "continuous", 1)}
ID_EXPERTS = {"seg-coco": "seg", "seg-ade": "seg", "objdet": "instances", "ocrdet": "words"}
PRISMER_EXPERTS = ["depth", "normal", "edge", "seg-coco", "objdet", "ocrdet"]
RGB_FEATURE = "rgb"
def derangement(usable: np.ndarray, seed: int) -> np.ndarray:
    """int64 [len(usable)]: for each usable sample, another usable sample (never itself), a fixed
    function of `seed` and the mask: the usable samples in a seeded random order, each reading the
    next one's (one cycle through them all). Unusable samples map to themselves (never read)."""
    usable_indices = np.flatnonzero(usable)
    if len(usable_indices) < 2:
        raise ValueError(f"{len(usable_indices)} usable sample(s); shuffling needs at least 2")
    order = usable_indices[np.random.default_rng(seed).permutation(len(usable_indices))]
    sources = np.arange(len(usable), dtype=np.int64)
    sources[order] = np.roll(order, -1)
    return sources


class PrismerOptions(PrismerParts):
    """`model.*` of `trainer fit --method prismer`: the model's config and what the task adds."""

    experts: list[str] = Field("prismer", validate_default=True,
                               description="cached expert features to read: a list or comma-separated names, "
                                           "prismer (all six), or [] for the RGB-only baseline")
    task: Literal["vqa", "caption"] = Field("vqa", description="vqa (VQA accuracy) | caption (CIDEr, BLEU)")
    inference: Literal["rank", "generate"] = Field(
        "rank", description="VQA: rank the answer list (Prismer's closed-ended) or generate freely")
    num_candidates: Positive = Field(16, description="rank: the answers scored in full, the top-k by first token")
    num_beams: Positive = Field(3, description="beam search width when generating")
    max_new_tokens: Positive | None = Field(None, description="most tokens generated; null: 10 for vqa, 20 for caption")
    min_new_tokens: NonNegative | None = Field(None, description="fewest tokens generated; null: 1 for vqa, 4 for "
                                                                 "caption (at most max_new_tokens)")
    max_length: Positive = Field(64, description="tokens per text (prompt + target), longer ones are cut")
    caption_prompt: str = Field("A picture of", description="the text a caption is generated after")
    answer_list_size: Positive = Field(3128, description="rank: the commonest training answers ranked (VQAv2's 3128)")
    augment: AugmentConfig | None = Field(default_factory=AugmentConfig,
                                          description="training augmentation (below); null: none")
    shuffle_experts: bool = Field(False, description="control: every image reads another image's expert labels")
    expert_lr: PositiveFloat | None = Field(None, description="learning rate of the parts that bring the experts in; "
                                                              "null: lr")

    @field_validator("experts", mode="before")
    @classmethod
    def expert_names(cls, value: Any) -> Any:
        if value in (None, "", "none"):
            return []
        if value == "prismer":
            return list(PRISMER_EXPERTS)
        return [name.strip() for name in value.split(",")] if isinstance(value, str) else value

    @field_validator("experts")
    @classmethod
    def known_experts(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in CONTINUOUS_EXPERTS and name not in ID_EXPERTS]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; known: {sorted(CONTINUOUS_EXPERTS) + sorted(ID_EXPERTS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"experts must be distinct, got {names}")
        return names

    @model_validator(mode="after")
    def derive_lengths(self) -> PrismerOptions:
        caption = self.task == "caption"
        if self.max_new_tokens is None:
            self.max_new_tokens = 20 if caption else 10
        if self.min_new_tokens is None:
            self.min_new_tokens = min(4 if caption else 1, self.max_new_tokens)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is more than max_new_tokens={self.max_new_tokens}")
        if self.shuffle_experts and not self.experts:
            raise ValueError("shuffle_experts needs experts to shuffle (experts is empty)")
        return self

    def config_for_model(self, experts: list[ExpertInput]) -> PrismerConfig:
        """The model's config: these options with the labels it reads."""
        return PrismerConfig(**self.model_dump(include=set(PrismerParts.model_fields)), experts=experts)


class PrismerMethod(Method):
    name = "prismer"
    Options = PrismerOptions
    options: PrismerOptions

    def __init__(self, config):
        super().__init__(config)
        self.vision_ref = check_model_ref("model.vision", self.options.vision, timm_name=True)
        self.lm_ref, self.lm_revision = self.options.lm, self.options.lm_revision
        self.tokenizer = load_frozen("model.lm", self.lm_ref, lambda: AutoTokenizer.from_pretrained(
            self.lm_ref, revision=self.lm_revision), self.lm_revision)
        self.tokenizer.padding_side = "left"
        self.answer_list: list[str] = []
        self.vocabularies: dict[str, np.ndarray] = {}

    def feature_fields(self) -> dict[str, str]:
        field_paths = {RGB_FEATURE: f"{RGB_FEATURE}/rgb"}
        for name in self.options.experts:
            if name in CONTINUOUS_EXPERTS:
                field_paths[name] = f"{name}/{CONTINUOUS_EXPERTS[name][0]}"
            else:
                field_paths[name] = f"{name}/{ID_EXPERTS[name]}"
        if "objdet" in self.options.experts:
            field_paths["objdet:classes"] = "objdet/classes"
        if "ocrdet" in self.options.experts:
            field_paths["ocrdet:embeddings"] = "ocrdet/embeddings"
        return field_paths

    def check_cache(self, reader: SplitReader) -> None:
        def spec(feature: str):
            try:
                return reader.spec(feature)
            except CacheError:
                raise MethodError(
                    f"prismer: {reader.source}/{reader.split} has no cached {feature!r} (it has: "
                    f"{', '.join(reader.feature_names) or 'none'}); run `precompute run --expert {feature} ...` "
                    f"first{'' if feature == RGB_FEATURE else ', or leave it out of model.experts'}"
                ) from None

        resolution = spec(RGB_FEATURE).params["resolution"]
        for name in self.options.experts:
            expert_spec = spec(name)
            if self.options.shuffle_experts and reader.feature(name).format == "wds":
                raise MethodError(f"prismer: model.shuffle_experts reads labels across samples, which a streamed "
                                  f"WebDataset feature ({reader.source}/{reader.split} {name}) cannot do; use a Zarr cache")
            if expert_spec.expert != name:
                raise MethodError(f"prismer: cached feature {name!r} was made by expert {expert_spec.expert!r}, not {name!r}")
            if expert_spec.params.get("resolution") != resolution:
                raise MethodError(f"prismer: {name} labels are {expert_spec.params.get('resolution')} px but rgb is "
                                  f"{resolution} px; labels and rgb must share one frame (same --expert-opt resolution)")

    def feature_sources(self, reader: SplitReader, usable: np.ndarray) -> dict[str, np.ndarray]:
        """With `shuffle_experts`, every expert field (ids, classes, word vectors together) of sample i
        is read from sample derangement[i]; RGB stays its own."""
        if not self.options.shuffle_experts:
            return {}
        try:
            sources = derangement(usable, self.config.seed)
        except ValueError as e:
            raise MethodError(f"prismer: model.shuffle_experts on {reader.source}/{reader.split}: {e}") from None
        return {field_name: sources for field_name in self.feature_fields() if field_name != RGB_FEATURE}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """With `expert_lr`, the parts that start from nothing and bring the experts in learn at their
        own rate: they sit behind zero-initialised read-outs, so at one shared rate they start last."""
        if self.options.expert_lr is None:
            return super().param_groups(model)
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        prefixes = ("vision.stems.", "vision.resampler.", "vision.readouts.", "vision.instance_embedding")
        def expert_part(name: str) -> bool:
            return name.startswith(prefixes) or ".latent_reader." in name

        expert_side = [p for name, p in trainable if expert_part(name)]
        rest = [p for name, p in trainable if not expert_part(name)]
        return [{"params": rest, "lr": self.config.lr}, {"params": expert_side, "lr": self.options.expert_lr}]

    def derive_state(self, train_reader: SplitReader) -> dict[str, Any]:
        if self.options.task != "vqa":
            return {}
        counts = Counter(training_answer(question) for annotations in train_reader.annotations
                         for question in annotations.get("questions", []))
        return {"answer_list": [answer for answer, _ in counts.most_common(self.options.answer_list_size)]}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.answer_list = list(state.get("answer_list", []))

    def build_model(self, reader: SplitReader) -> nn.Module:
        experts = []
        for name in self.options.experts:
            if name in CONTINUOUS_EXPERTS:
                experts.append(ExpertInput(name, channels=CONTINUOUS_EXPERTS[name][2]))
            else:
                experts.append(ExpertInput(name, ids=True, instances=name == "objdet"))
                if name != "ocrdet":
                    self.vocabularies[name] = self.class_vectors(reader, name)
        vit = load_frozen("model.vision", self.vision_ref, lambda: load_timm_model(self.vision_ref), timm_name=True)
        lm = load_frozen("model.lm", self.lm_ref, lambda: load_decoder(self.lm_ref, self.lm_revision), self.lm_revision)
        try:
            model = Prismer(self.options.config_for_model(experts), vit, lm)
        except (OSError, TypeError, ValueError) as e:
            raise MethodError(f"prismer: {e}") from e
        data_config = resolve_data_config({}, model=model.vision.vit)
        self.image_size = model.vision.image_size
        self.mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(3, 1, 1)
        return model

    @staticmethod
    def class_vectors(reader: SplitReader, name: str) -> np.ndarray:
        """float32 [classes, 64]: a segmentation or detection class table (segmentation: 256 rows, id 255 zero)."""
        table_name = reader.spec(name).params.get("table", name)
        try:
            table = read_table(reader.layout.root, table_name)
        except CacheError as e:
            raise MethodError(f"prismer: {e}") from e
        num_classes, width = table.embeddings.shape
        if width != EMBEDDING_DIM:
            raise MethodError(f"prismer: class table {table_name!r} is {width}-d, expected {EMBEDDING_DIM}")
        if name in ("seg-coco", "seg-ade") and num_classes >= NUM_IDS:
            raise MethodError(f"prismer: class table {table_name!r} has {num_classes} classes; a uint8 map holds at most 255")
        vectors = np.zeros((max(NUM_IDS, num_classes), EMBEDDING_DIM), dtype=np.float32)
        vectors[:num_classes] = table.embeddings
        return vectors

    def expand(self, annotations: dict[str, Any], train: bool) -> list[dict[str, Any]]:
        """Training: one example per image holding all its texts, so the image side runs once for
        its five questions or captions. Evaluation: one example per question (per image for captions)."""
        if self.options.task == "vqa":
            questions = annotations.get("questions", [])
            if train:
                return [{"prompts": [vqa_prompt(q["question"]) for q in questions],
                         "targets": [" " + training_answer(q) for q in questions], "train": True}] if questions else []
            return [{"prompts": [vqa_prompt(q["question"])], "qid": str(q.get("question_id", index)),
                     "answers": q.get("answers", []), "answer_type": q.get("answer_type", ""), "train": False}
                    for index, q in enumerate(questions)]
        captions = annotations.get("captions", [])
        prompt = self.options.caption_prompt
        if train:
            return [{"prompts": [prompt] * len(captions), "targets": [" " + c for c in captions], "train": True}] if captions else []
        return [{"prompts": [prompt], "references": captions, "train": False}] if captions else []

    def expert_labels(self, item: dict[str, Any]) -> dict[str, Any]:
        """One sample's RGB and labels, augmented together, as the model reads them (before batching)."""
        views = {RGB_FEATURE: torch.from_numpy(item[RGB_FEATURE])}
        kinds = {RGB_FEATURE: "rgb"}
        for name in self.options.experts:
            views[name] = torch.from_numpy(item[name])
            kinds[name] = CONTINUOUS_EXPERTS[name][1] if name in CONTINUOUS_EXPERTS else "ids"
        views = augment_views(views, kinds, self.image_size, self.options.augment if item["train"] else None)
        sample = {RGB_FEATURE: (views[RGB_FEATURE].float() / 255 - self.mean) / self.std}
        for name in self.options.experts:
            if name in CONTINUOUS_EXPERTS:
                sample[name] = views[name].float() / 127.5 - 1
            else:
                sample[name] = (views[name][0], torch.from_numpy(self.id_vectors(name, item)))
        return sample

    def id_vectors(self, name: str, item: dict[str, Any]) -> np.ndarray:
        """[256, 64]: the vector of every id the sample's `name` map can hold (255: zero)."""
        if name == "ocrdet":
            vectors = np.zeros((NUM_IDS, EMBEDDING_DIM), dtype=np.float32)
            vectors[: NUM_IDS - 1] = item["ocrdet:embeddings"]
            return vectors
        if name == "objdet":
            vectors = np.zeros((NUM_IDS, EMBEDDING_DIM), dtype=np.float32)
            vectors[: NUM_IDS - 1] = self.vocabularies[name][item["objdet:classes"].astype(np.int64)]
            return vectors
        return self.vocabularies[name][:NUM_IDS]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [self.expert_labels(item) for item in items]
        expert_labels = {}
        for name in self.options.experts:
            if name in CONTINUOUS_EXPERTS:
                expert_labels[name] = torch.stack([sample[name] for sample in samples])
            else:
                expert_labels[name] = tuple(torch.stack([sample[name][i] for sample in samples]) for i in range(2))
        prompts = [prompt for item in items for prompt in item["prompts"]]
        targets = [target for item in items for target in item["targets"]] if items[0]["train"] else None
        batch = encode_batch(self.tokenizer, prompts, targets, self.options.max_length)
        batch["image_index"] = torch.tensor([i for i, item in enumerate(items) for _ in item["prompts"]])
        batch["rgb"] = torch.stack([sample[RGB_FEATURE] for sample in samples])
        batch["expert_labels"] = expert_labels
        fields_read = set(self.feature_fields())
        batch["items"] = [{k: v for k, v in item.items() if k not in fields_read and k != "train"} for item in items]
        return batch

    @staticmethod
    def inputs(model: Prismer, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
        device = model.lm.device
        expert_labels = {name: tuple(t.to(device) for t in value) if isinstance(value, tuple) else value.to(device)
                         for name, value in batch["expert_labels"].items()}
        return batch["rgb"].to(device), expert_labels, batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device = model.lm.device
        return model(*self.inputs(model, batch), labels=batch["labels"].to(device),
                     image_index=batch["image_index"].to(device)).loss

    def answer_tokens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[A, L] every answer's tokens + eos, right-padded, and its mask."""
        if not self.answer_list:
            raise MethodError("prismer: rank inference needs the answer list from training (none in this checkpoint)")
        rows = [ids + [self.tokenizer.eos_token_id] for ids in
                self.tokenizer([" " + answer for answer in self.answer_list], add_special_tokens=False)["input_ids"]]
        width = max(len(row) for row in rows)
        answer_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            answer_ids[index, : len(row)] = torch.tensor(row)
        return answer_ids.to(device), (answer_ids != self.tokenizer.pad_token_id).long().to(device)

    def predict(self, model: nn.Module, loader: DataLoader) -> list[dict[str, Any]]:
        rank = self.options.task == "vqa" and self.options.inference == "rank"
        if rank:
            answer_ids, answer_mask = self.answer_tokens(model.lm.device)
        predictions = []
        for batch in loader:
            inputs = self.inputs(model, batch)
            if rank:
                best = model.rank_answers(*inputs, answer_ids, answer_mask, self.options.num_candidates).tolist()
                texts = [self.answer_list[index] for index in best]
            else:
                generated = model.generate(*inputs, max_new_tokens=self.options.max_new_tokens,
                                           min_new_tokens=self.options.min_new_tokens, num_beams=self.options.num_beams)
                texts = [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in generated]
            predictions.extend({**item, "prediction": text} for item, text in zip(batch["items"], texts))
        return predictions

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        if not predictions:
            raise MethodError("prismer: the evaluation split has no examples for this task")
        return vqa_or_caption_metrics(self.options.task, predictions)

    def backbones(self) -> dict[str, dict[str, str]]:
        vision_id, vision_revision = model_revision(self.vision_ref)
        lm_id, lm_revision = model_revision(self.lm_ref, self.lm_revision)
        return {"vision": {"id": vision_id, "revision": vision_revision}, "lm": {"id": lm_id, "revision": lm_revision}}
