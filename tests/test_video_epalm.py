"""eP-ALM on video and audio, unchanged: an MSRVTT-QA-layout dataset -> `timesformer-cls` through the
real engine -> `trainer fit --method epalm model.feature=timesformer-cls`, scored by exact match (one
answer per question); AudioCaps -> `ast-cls` with cached augmented views -> audio captioning; tiny
TimeSformer, AST and OPT loaded by path."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from cache_schema import SplitReader
from precompute.engine import RunConfig, run
from test_expert_video_audio import save_tiny_ast, save_tiny_timesformer
from test_media import write_csv, write_json, write_tone, write_video
from trainer.config import TrainConfig
from trainer.data import check_views, train_batches, training_examples
from trainer.loop import fit
from trainer.methods import MethodError, get_method

QUESTIONS = [("what is moving?", "square"), ("what color is the square?", "white")]


def write_msrvtt_qa(root: Path, videos: dict[str, range]) -> None:
    """MSRVTT-QA: {split}_qa.json over TrainValVideo/video{N}.mp4 (the layout HCRN's loader reads)."""
    question_id = 0
    for split, numbers in videos.items():
        entries = []
        for number in numbers:
            write_video(root / "TrainValVideo" / f"video{number}.mp4", 6 + number % 3)
            for question, answer in QUESTIONS:
                entries.append({"question": question, "answer": answer, "video_id": number, "id": question_id,
                                "category_id": 0})
                question_id += 1
        write_json(root / f"{split}_qa.json", entries)


def test_epalm_trains_on_timesformer_cls_and_scores_exact_match(tmp_path, tiny_lm_dir, ray_local):
    root, cache = tmp_path / "msrvtt", tmp_path / "cache"
    write_msrvtt_qa(root, {"train": range(0, 8), "val": range(8, 11)})
    model = save_tiny_timesformer(tmp_path / "timesformer")
    for split in ("train", "val"):
        summaries = run(RunConfig(experts=["timesformer-cls"], source="msrvtt", split=split, cache=str(cache),
                                  data_root=str(root), models={"timesformer-cls": str(model)}, shard_size=8,
                                  batch_size=4, expert_options={"timesformer-cls": {"num_frames": 4, "levels": 2}}),
                        progress=False)
        assert summaries[0].invalid == 0 and not summaries[0].shards_failed
    out = tmp_path / "run"
    config = TrainConfig(method="epalm", cache=str(cache), out=str(out), batch_size=4, max_steps=4, warmup_steps=1,
                         lr=1e-3, num_workers=0, save_every=100, log_every=1,
                         model={"lm": str(tiny_lm_dir), "feature": "timesformer-cls", "num_levels": 2, "num_beams": 1,
                                "max_new_tokens": 3})
    metrics = fit(config, progress=False)
    assert set(metrics) == {"exact_match"}  # one answer per question: VQA's leave-one-out accuracy does not apply
    features = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["features"]
    assert features["timesformer-cls/cls"]["expert"] == "timesformer-cls"
    predictions = (out / "checkpoint" / "predictions-val.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * len(QUESTIONS)


def write_audiocaps(root: Path, clips: dict[str, int]) -> None:
    """AudioCaps: {split}.csv (audiocap_id, youtube_id, start_time, caption) over audio/{split}/{youtube_id}.wav."""
    for split, count in clips.items():
        rows = []
        for number in range(count):
            youtube_id = f"{split}{number}"
            write_tone(root / "audio" / split / f"{youtube_id}.wav", 300 + 400 * (number % 2), 16000, seconds=1.5)
            rows.append([number, youtube_id, 0, CAPTIONS[number % 2]])
        write_csv(root / f"{split}.csv", rows)


CAPTIONS = ["a red circle", "a blue square"]


def test_epalm_trains_on_cached_augmented_audio_views(tmp_path, tiny_lm_dir, ray_local):
    """`ast-cls` with views=2 -> `model.views=true`: an epoch has as many examples as without views,
    each clip's captions read one of its clean [CLS] stack and its 2 masked ones (trainer/data.py's
    seeded draw); evaluation reads the clean one. A cache without views is refused by name."""
    root, cache, plain = tmp_path / "audiocaps", tmp_path / "cache", tmp_path / "plain"
    write_audiocaps(root, {"train": 4, "val": 2})
    model = save_tiny_ast(tmp_path / "ast")
    for split in ("train", "val"):
        summaries = run(RunConfig(experts=["ast-cls"], source="audiocaps", split=split, cache=str(cache),
                                  data_root=str(root), models={"ast-cls": str(model)}, shard_size=4, batch_size=2,
                                  expert_options={"ast-cls": {"levels": 2, "views": 2}}), progress=False)
        assert summaries[0].invalid == 0 and not summaries[0].shards_failed
    config = TrainConfig(method="epalm", cache=str(cache), out=str(tmp_path / "run"), batch_size=4, max_steps=3,
                         warmup_steps=1, lr=1e-3, num_workers=0, save_every=100, log_every=1,
                         model={"lm": str(tiny_lm_dir), "feature": "ast-cls", "task": "caption", "views": True,
                                "num_levels": 2, "num_beams": 1, "max_new_tokens": 3})

    method = get_method(config)
    reader = SplitReader(cache, "audiocaps", "train")
    train_set = training_examples(reader, method, config)
    assert len(train_set) == 4  # one caption per clip, whatever the number of views
    stored = reader.feature("ast-cls")
    state = {"epoch": 0, "batch_in_epoch": 0}
    views = set()
    for batch in itertools.islice(train_batches(train_set, method, config, state), 8):  # 8 epochs of one batch
        for item, visual in zip(batch["items"], batch["visual"]):
            row = stored.get_by_key(item["key"])
            expected = row["cls"] if item["view"] == 0 else row["views"][item["view"] - 1]
            torch.testing.assert_close(visual, torch.from_numpy(expected).float())
            views.add(item["view"])
    assert views == {0, 1, 2}
    assert {len(method.expand(a, train=False)) for a in reader.annotations} == {1}  # evaluation: clean only

    metrics = fit(config, progress=False)
    assert {"BLEU-4", "CIDEr"} <= set(metrics)

    run(RunConfig(experts=["ast-cls"], source="audiocaps", split="train", cache=str(plain), data_root=str(root),
                  models={"ast-cls": str(model)}, shard_size=4, expert_options={"ast-cls": {"levels": 2}}), progress=False)
    with pytest.raises(MethodError, match="caches no augmented views of 'ast-cls'.*--expert-opt views=N"):
        check_views(SplitReader(plain, "audiocaps", "train"), get_method(config))
