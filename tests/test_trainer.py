"""The shared trainer with eP-ALM on a real (small) cache: data, checkpoints, resume, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cache_schema import ArraySpec, CacheError, CacheWriter, FeatureSpec, SplitPlan, SplitReader
from cache_schema.torch_data import ShardStream
from precompute.sources.shapes import ShapesSource
from trainer.checkpoint import load_trainable, trainable_state
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.data import eval_examples, pick_view, train_batches, training_examples
from trainer.loop import evaluate_checkpoint, fit
from trainer.methods import MethodError, get_method

LEVELS, WIDTH = 4, 16


def write_shapes_cache(root: Path | str, split: str, num: int, invalid: set[int] = frozenset(), format: str = "zarr",
                       views: int = 0) -> None:
    """Shapes annotations + a `vit-cls` feature written straight through the cache contract (no Ray);
    with `views`, as many augmented views per sample beside it (random, like the clean tokens)."""
    samples = ShapesSource(None, split, num=num).samples()
    plan = SplitPlan("shapes", split, [s.key for s in samples], [s.annotations for s in samples], shard_size=16)
    arrays = (ArraySpec("cls", "float16", (LEVELS, WIDTH)),) + ((ArraySpec("views", "float16", (views, LEVELS, WIDTH)),)
                                                                if views else ())
    spec = FeatureSpec("vit-cls", "vit-cls", "test-vit", "r0", "p0", arrays, {"layers": [2, 3, 4, 5]})
    writer = CacheWriter(root, format=format)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    rng = np.random.default_rng(len(split))
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        cls = rng.standard_normal((stop - start, LEVELS, WIDTH)).astype(np.float16)
        valid = np.array([i not in invalid for i in range(start, stop)])
        cls[~valid] = 0
        stored = {"cls": cls}
        if views:
            stored["views"] = rng.standard_normal((stop - start, views, LEVELS, WIDTH)).astype(np.float16)
        invalid_keys = {plan.keys[i]: "corrupt" for i in range(start, stop) if i in invalid}
        writer.write_shard("shapes", split, spec, shard, start, plan.shard_keys(shard), stored, valid,
                           invalid_keys, 0.1, "cpu")


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    write_shapes_cache(root, "train", 40, invalid={3})
    write_shapes_cache(root, "val", 8)
    return root


def make_config(cache: Path, out: Path, lm: Path, **changes) -> TrainConfig:
    values = dict(method="epalm", cache=str(cache), out=str(out), batch_size=8, max_steps=4, warmup_steps=1, lr=1e-3,
                  num_workers=0, save_every=2, log_every=1,
                  model={"lm": str(lm), "num_levels": 2, "num_beams": 2, "max_new_tokens": 3})
    values.update(changes)
    return TrainConfig(**values)


def test_examples_expand_per_question_and_skip_gaps(cache, tiny_lm_dir, tmp_path):
    method = get_method(make_config(cache, tmp_path / "run", tiny_lm_dir))
    reader = SplitReader(cache, "shapes", "train")
    examples = reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=True))
    assert examples.skipped_samples == 1
    assert len(examples) == sum(len(a["questions"]) for i, a in enumerate(reader.annotations) if i != 3)
    item = examples[0]
    assert item["visual"].shape == (LEVELS, WIDTH) and item["prompt"].startswith("question: ")
    assert item["target"].startswith(" ") and item["key"] == reader.keys[0]
    batch = method.collate([examples[i] for i in range(4)])
    assert batch["visual"].shape == (4, LEVELS, WIDTH) and (batch["labels"] != -100).any()
    captions = get_method(make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "task": "caption"}))
    assert len(captions.expand(reader.annotations[0], train=True)) == 5
    assert len(captions.expand(reader.annotations[0], train=False)) == 1


def test_fit_checkpoint_holds_only_trained_tensors_and_eval_reproduces(cache, tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    metrics = fit(make_config(cache, out, tiny_lm_dir), progress=False)
    checkpoint = out / "checkpoint"
    tensors = load_file(checkpoint / "model.safetensors")
    info = json.loads((checkpoint / "checkpoint.json").read_text())
    assert set(tensors) and all(name.startswith(("connectors.", "soft_prompt.")) for name in tensors)
    assert sum(t.numel() for t in tensors.values()) == info["trainable_parameters"]
    assert info["backbones"]["lm"]["id"] == str(tiny_lm_dir.resolve()) and info["backbones"]["lm"]["revision"].startswith("sha256:")
    assert info["step"] == 4 and (checkpoint / "config.yaml").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and "examples_per_s" in log[0]
    assert "vqa_accuracy" in metrics and 0 <= metrics["vqa_accuracy"] <= 100
    fit_predictions = (checkpoint / "predictions-val.jsonl").read_text()

    again = evaluate_checkpoint(str(cache), checkpoint, None, [], out=tmp_path / "eval")
    assert again == metrics
    assert (tmp_path / "eval" / "predictions-val.jsonl").read_text() == fit_predictions
    # `trainer predict`: the same records, no metrics
    assert evaluate_checkpoint(str(cache), checkpoint, None, [], out=tmp_path / "predict", score=False) == {}
    assert (tmp_path / "predict" / "predictions-val.jsonl").read_text() == fit_predictions


def test_resume_after_kill_equals_uninterrupted(cache, tiny_lm_dir, tmp_path):
    common = ["--cache", str(cache), "--method", "epalm", "--max-steps", "30", "--no-progress", f"model.lm={tiny_lm_dir}",
              "model.num_levels=2", "batch_size=4", "num_workers=0", "save_every=3", "lr=1e-3", "eval_split=null"]
    assert_kill_and_resume_equals_uninterrupted(common, tmp_path, steps=30)


def assert_kill_and_resume_equals_uninterrupted(common: list[str], tmp_path: Path, steps: int) -> Path:
    """`trainer fit` straight through, and again SIGKILLed after its first checkpoint then rerun:
    the resumed run says where it resumed and ends with the same weights. The straight run's OUT."""
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--out", str(straight), *common], check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "fit", "--out", str(killed), *common],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint" / "checkpoint.json").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = json.loads((killed / "checkpoint" / "checkpoint.json").read_text())["step"]
    assert step_at_kill < steps
    resumed = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--out", str(killed), *common],
                             capture_output=True, text=True, check=True)
    assert f"at step {step_at_kill}" in resumed.stdout
    a, b = load_file(straight / "checkpoint" / "model.safetensors"), load_file(killed / "checkpoint" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    return straight


def test_webdataset_cache_at_a_url_streams_resumes_after_kill_and_evaluates(tiny_lm_dir, tmp_path):
    """Tar shards behind a file:// URL (fsspec, as s3:// would be): the trainer streams them, a
    killed run resumes mid-epoch to the same weights, and the checkpoint evaluates on the tars."""
    cache = f"file://{tmp_path}/wds-cache"
    write_shapes_cache(cache, "train", 40, invalid={3}, format="wds")
    write_shapes_cache(cache, "val", 8, format="wds")
    config = make_config(cache, tmp_path / "run", tiny_lm_dir)
    reader = SplitReader(cache, "shapes", "train")
    train_set = training_examples(reader, get_method(config), config)
    assert isinstance(train_set, ShardStream) and train_set.skipped_samples == 1
    assert len(train_set) == sum(len(a["questions"]) for i, a in enumerate(reader.annotations) if i != 3)

    common = ["--cache", cache, "--method", "epalm", "--max-steps", "24", "--no-progress", f"model.lm={tiny_lm_dir}",
              "model.num_levels=2", "batch_size=4", "num_workers=2", "shuffle_buffer=16", "save_every=3", "lr=1e-3",
              "eval_split=null"]
    straight = assert_kill_and_resume_equals_uninterrupted(common, tmp_path, steps=24)
    metrics = evaluate_checkpoint(cache, straight / "checkpoint", "val", [])
    assert 0 <= metrics["vqa_accuracy"] <= 100


def test_a_library_callers_messages_go_through_logging(cache, tiny_lm_dir, tmp_path, caplog):
    """What `fit` says reaches the `trainer` logger (a library user captures, routes or silences it);
    the CLI prints it (test_resume_after_kill_equals_uninterrupted reads it from stdout)."""
    import logging

    import torch

    from trainer.loop import build_run

    config = make_config(cache, tmp_path / "run", tiny_lm_dir)
    with caplog.at_level(logging.INFO, logger="trainer"):
        build_run(config, torch.device("cpu"))
    [record] = [r for r in caplog.records if "training examples from" in r.getMessage()]
    assert record.name == "trainer.loop" and record.levelno == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # silenced
        build_run(config, torch.device("cpu"))
    assert not caplog.records


def test_missing_feature_and_misfit_spec_fail_before_training(cache, tiny_lm_dir, tmp_path):
    config = make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "feature": "clip-cls"})
    with pytest.raises(CacheError, match="no feature 'clip-cls'.*vit-cls"):
        fit(config, progress=False)
    config = make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "visual_dim": 768})
    with pytest.raises(MethodError, match="visual_dim=768 but the cached \\[CLS\\] tokens are 16-d"):
        fit(config, progress=False)
    config = make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "num_levels": 6})
    with pytest.raises(MethodError, match="num_levels=6 but the cache holds 4 levels"):
        fit(config, progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--cache", str(tmp_path / "nowhere"),
                             f"model.lm={tiny_lm_dir}"], capture_output=True, text=True)
    assert result.returncode == 2 and "no cache.json" in result.stderr


@pytest.mark.parametrize("format", ["zarr", "wds"])
def test_views_one_seeded_draw_per_sample_and_epoch_and_evaluation_reads_the_clean_feature(tiny_lm_dir, tmp_path, format):
    """`model.views=true` over a cache with 3 views: every epoch has as many examples as without views;
    each sample trains on one of its clean [CLS] stack and 3 views, `pick_view(seed, key, epoch, 4)`,
    the same for all its questions, whatever the order (Zarr's sampler or the WebDataset stream); a
    rerun draws the same, another seed or epoch draws otherwise; evaluation never reads the views."""
    cache = tmp_path / "cache"
    write_shapes_cache(cache, "train", 24, invalid={3}, format=format, views=3)
    write_shapes_cache(cache, "val", 8, format=format)
    reader = SplitReader(cache, "shapes", "train")
    stored = {"cls": reader.feature("vit-cls").read("cls"), "views": reader.feature("vit-cls").read("views")}

    def epochs(seed: int, views: bool = True) -> list[list[dict]]:
        config = make_config(cache, tmp_path / "run", tiny_lm_dir, seed=seed, batch_size=8,
                             model={"lm": str(tiny_lm_dir), "num_levels": 2, "views": views})
        method = get_method(config)
        train_set = training_examples(reader, method, config)
        state = {"epoch": 0, "batch_in_epoch": 0}
        seen: list[list[dict]] = [[], []]
        for batch in train_batches(train_set, method, config, state):
            if state["epoch"] == 2:
                break
            for item, visual in zip(batch["items"], batch["visual"]):
                seen[state["epoch"]].append({**item, "visual": visual})
        return seen

    plain, drawn = epochs(0, views=False), epochs(0)
    assert [len(epoch) for epoch in drawn] == [len(epoch) for epoch in plain] and len(drawn[0]) >= 48
    for epoch, items in enumerate(drawn):
        per_sample: dict[str, set[int]] = {}
        for item in items:
            index = reader.keys.index(item["key"])
            assert item["view"] == pick_view(0, item["key"], epoch, 4)
            expected = stored["cls"][index] if item["view"] == 0 else stored["views"][index, item["view"] - 1]
            torch.testing.assert_close(item["visual"], torch.from_numpy(expected).float())
            per_sample.setdefault(item["key"], set()).add(item["view"])
        assert all(len(views) == 1 for views in per_sample.values())
    first = {item["key"]: item["view"] for item in drawn[0]}
    second = {item["key"]: item["view"] for item in drawn[1]}
    assert set(first.values()) == {0, 1, 2, 3} and first != second
    assert [[item["view"] for item in epoch] for epoch in epochs(0)] == [[item["view"] for item in epoch] for epoch in drawn]
    assert {item["key"]: item["view"] for item in epochs(1)[0]} != first

    method = get_method(make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "views": True}))
    evaluation = eval_examples(SplitReader(cache, "shapes", "val"), method, make_config(cache, tmp_path, tiny_lm_dir))
    assert set(method.feature_fields()) == {"visual"} and all("visual.views" not in evaluation[i] for i in range(3))


def test_views_on_a_cache_without_them_are_refused_naming_the_feature(cache, tiny_lm_dir, tmp_path):
    config = make_config(cache, tmp_path / "run", tiny_lm_dir, model={"lm": str(tiny_lm_dir), "num_levels": 2, "views": True})
    with pytest.raises(MethodError, match="epalm: model.views=true, but shapes/train caches no augmented views of "
                                          "'vit-cls' \\(precompute it with --expert-opt views=N\\)"):
        fit(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nbatch_size: 16\nmodel:\n  lm: facebook/opt-350m\n  variant: pt\n")
    config = load_config(path, ["model.variant=lin", "lr=1e-3", "max_steps=7"], out="o", method=None)
    assert (config.lr, config.batch_size, config.max_steps, config.out) == (1e-3, 16, 7, "o")
    assert config.model == {"lm": "facebook/opt-350m", "variant": "lin"}
    assert load_config(path, []).lr == 3e-4
    with pytest.raises(ConfigError, match="unknown config key.*'lrr'"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(None, ["lr"])


def test_the_schedule_is_linear_warmup_then_cosine_to_min_lr_for_every_group():
    """transformers' schedule, as the trainer builds it: after warmup exactly the cosine the loop
    used to compute by hand (to min_lr / lr of each group's own peak); during warmup step s runs at
    s / warmup of the peak, one step behind the old (s + 1) / warmup (so step 0 runs at 0)."""
    import math

    import torch

    from trainer.loop import lr_schedule

    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=3)
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.AdamW([{"params": weights[:1], "lr": 1e-3}, {"params": weights[1:], "lr": 5e-3}])
    scheduler = lr_schedule(optimizer, config, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    floor = 1e-5 / 1e-3
    for step, (low, high) in enumerate(rates):
        factor = (step / 3 if step < 3 else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - 3) / 7)))
        assert (low, high) == (pytest.approx(1e-3 * factor), pytest.approx(5e-3 * factor))
    assert rates[0] == [0.0, 0.0] and rates[3] == [pytest.approx(1e-3), pytest.approx(5e-3)]


def test_epalm_prompt_and_adapters_train_at_their_own_fixed_rate(cache, tiny_lm_dir, tmp_path):
    """eP-ALM's recipe: prompt and adapters at a fixed lr beside the connections' warmup + cosine;
    without the keys, one group at the run's lr (as before)."""
    from trainer.loop import lr_schedule

    model_options = {"lm": str(tiny_lm_dir), "num_levels": 2, "variant": "default", "adapters": True}
    config = make_config(cache, tmp_path / "run", tiny_lm_dir, lr=2e-3, min_lr=1e-5, warmup_steps=2,
                         model={**model_options, "prompt_lr": 1e-3, "adapter_lr": 5e-4})
    method = get_method(config)
    model = method.build_model(SplitReader(cache, "shapes", "train"))
    groups = method.param_groups(model)
    names = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
    by_part = {frozenset(names[id(p)] for p in g["params"]): (g["lr"], g["fixed_lr"]) for g in groups}
    assert by_part == {frozenset({"connectors"}): (2e-3, False), frozenset({"soft_prompt"}): (1e-3, True),
                       frozenset({"attention_adapters", "ffn_adapters"}): (5e-4, True)}
    optimizer = torch.optim.AdamW(groups)
    scheduler = lr_schedule(optimizer, config, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [r[0] for r in rates][:3] == [0.0, pytest.approx(1e-3), pytest.approx(2e-3)]  # warmup, then decay
    assert rates[-1][0] < 2e-3
    assert all(r[1:] == [1e-3, 5e-4] for r in rates)  # fixed from the first step to the last
    plain = get_method(make_config(cache, tmp_path / "plain", tiny_lm_dir, model=model_options))
    assert [(len(g["params"]), g["lr"]) for g in plain.param_groups(model)] == [
        (sum(p.requires_grad for p in model.parameters()), 1e-3)]


def test_a_checkpoint_keeps_the_running_statistics_of_trained_modules_only(tmp_path):
    """BatchNorm in a trained part evaluates with the statistics it gathered in training; a frozen
    module's buffers come from its own checkpoint and are not saved again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    model[2].requires_grad_(False)
    for _ in range(5):
        model(torch.randn(16, 3) * 3 + 2)
    save_file(trainable_state(model), tmp_path / "model.safetensors")
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(trainable_state(model))
    assert not any(name.startswith("2.") for name in trainable_state(model))

    torch.manual_seed(1)
    reloaded = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    reloaded[2].load_state_dict(model[2].state_dict())
    reloaded[2].requires_grad_(False)
    load_trainable(reloaded, tmp_path)
    x = torch.randn(8, 3)
    assert torch.equal(model.eval()(x), reloaded.eval()(x))
