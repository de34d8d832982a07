"""eP-ALM on video, unchanged: an MSRVTT-QA-layout dataset -> `timesformer-cls` through the real engine
-> `trainer fit --method epalm model.feature=timesformer-cls`, scored by exact match (one answer per
question), with a tiny TimeSformer and a tiny OPT loaded by path."""

from __future__ import annotations

import json
from pathlib import Path

from precompute.engine import RunConfig, run
from test_expert_video_audio import save_tiny_timesformer
from test_media import write_json, write_video
from trainer.config import TrainConfig
from trainer.loop import fit

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
