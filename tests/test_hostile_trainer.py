"""`trainer` fed hostile input: bad config values, a changed config on resume, a file for --out,
model references that cannot load. Each case runs the real CLI against a tiny real cache and a
tiny real OPT and asserts the contract for bad input: exit 2, one line on stderr naming what is
wrong, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_trainer import write_shapes_cache
from trainer.cli import main
from trainer.config import ConfigError

CLI = [sys.executable, "-m", "trainer.cli"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "cache"
    write_shapes_cache(root, "train", 24)
    write_shapes_cache(root, "val", 8)
    return root


def fit_args(cache: Path, out: Path, lm: Path, *extra: str) -> list[str]:
    return ["fit", "--cache", str(cache), "--out", str(out), "--no-progress", f"model.lm={lm}", "model.num_levels=2",
            "batch_size=8", "num_workers=0", "warmup_steps=1", "lr=1e-3", "save_every=2", "log_every=1",
            "eval_split=null", *extra]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes ({} if `root` is not there): "nothing written" is this, unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run `trainer` in this process: exit 2 and one stderr line holding every `expected`; the line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"trainer {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err
    return err


BAD_VALUES = [  # override, why, how the value is shown back
    ("batch_size=0", "greater than or equal to 1", "0"), ("batch_size=abc", "a valid integer", "'abc'"),
    ("max_steps=1.5", "a valid integer", "1.5"), ("max_steps=0", "greater than or equal to 1", "0"),
    ("seed=true", "a valid integer", "True"), ("epochs=-1", "greater than 0", "-1"), ("epochs=0", "greater than 0", "0"),
    ("grad_accum=0", "greater than or equal to 1", "0"), ("lr=-1e-3", "greater than 0", "-0.001"),
    ("warmup_steps=-1", "greater than or equal to 0", "-1"), ("save_every=0", "greater than or equal to 1", "0"),
    ("log_every=0", "greater than or equal to 1", "0"), ("num_workers=-1", "greater than or equal to 0", "-1"),
    ("shuffle_buffer=0", "greater than or equal to 1", "0"), ("max_failures=-1", "greater than or equal to 0", "-1"),
    ("max_eval_examples=0", "greater than or equal to 1", "0"), ("model=3", "a valid dictionary", "3"),
]


@pytest.mark.parametrize("override,why,shown", BAD_VALUES, ids=[item for item, _, _ in BAD_VALUES])
def test_a_bad_config_value_is_one_line_before_any_work(cache, tiny_lm_dir, tmp_path, capsys, override, why, shown):
    out = tmp_path / "run"
    key = override.partition("=")[0]
    args = fit_args(cache, out, tiny_lm_dir, override)
    if key == "model":  # model=3 replaces the model section the other overrides fill
        args = [a for a in args if not a.startswith("model.")]
    refused(capsys, args, f"error: {key}: should be {why}, got {shown}")
    assert not out.exists()


BAD_MODEL_VALUES = [  # method, override(s), what the one line says: a wrong type, an unknown key, out of range
    ("epalm", ["model.num_beams=abc"], "model.num_beams: should be a valid integer, got 'abc'"),
    ("epalm", ["model.blind=maybe"], "model.blind: should be a valid boolean, got 'maybe'"),
    ("epalm", ["model.variant=prefix"], "model.variant: should be 'lin', 'pt', 'default' or 'ada', got 'prefix'"),
    ("epalm", ["model.num_levels=0"], "model.num_levels: should be greater than or equal to 1, got 0"),
    ("epalm", ["model.num_level=2"], "model.num_level: unknown key (known: lm, lm_revision, variant,"),
    ("epalm", ["model.lm=null"], "model.lm: should be a valid string, got None"),
    ("epalm", ["model.views=3"], "model.views: should be a valid boolean, got 3"),
    ("prismer", ["model.expert_lr=fast"], "model.expert_lr: should be a valid number, got 'fast'"),
    ("prismer", ["model.augment.flip=sometimes"], "model.augment.flip: should be a valid boolean, got 'sometimes'"),
    ("prismer", ["model.augment.randaugment_magnitude=30"],
     "model.augment.randaugment_magnitude: should be less than or equal to 10, got 30"),
    ("prismer", ["model.augment.flp=false"], "model.augment.flp: unknown key (known: crop_scale, crop_ratio, flip,"),
    ("prismer", ["model.experts=[depth,sonar]"], "model.experts: unknown expert(s) ['sonar']"),
    ("prismer", ["model.min_new_tokens=12"], "model: min_new_tokens=12 is more than max_new_tokens=10"),
    ("mope", ["model.num_experts=1.5"], "model.num_experts: should be a valid integer, got 1.5"),
    ("mope", ["model.temperature=0"], "model.temperature: should be greater than 0, got 0"),
    ("mope", ["model.routing=top2"], "model.routing: should be 'dense' or 'top1', got 'top2'"),
    ("mope", ["model.prompts=[static,deep]"], "model.prompts: should be 'static', 'dynamic' or 'mapped', got 'deep'"),
    ("mope", ["model.num_experts_typo=3"], "model.num_experts_typo: unknown key (known: prompts,"),
    ("mope", ["model.views=2"], "model.views: should be a valid boolean, got 2"),
    ("mope", ["model.views=true", "model.complementary=null"],
     "model: views=true reads the complementary embedding's cached views, but complementary is null"),
]


@pytest.mark.parametrize("method,overrides,said", BAD_MODEL_VALUES, ids=[" ".join(o) for _, o, _ in BAD_MODEL_VALUES])
def test_a_bad_model_option_is_one_line_before_any_work(cache, tiny_lm_dir, tmp_path, capsys, method, overrides, said):
    """Each method's `model.*` keys are typed: a value of the wrong type, an unknown key or one out of
    range is one line naming `model.KEY`, exit 2, and OUT is not made (nothing loads before)."""
    out = tmp_path / "run"
    args = fit_args(cache, out, tiny_lm_dir, "max_steps=2")
    if method != "epalm":  # epalm's model.lm and model.num_levels are no keys of theirs
        args = [a for a in args if not a.startswith("model.")] + ["--method", method]
    refused(capsys, [*args, *overrides], f"error: {said}")
    assert not out.exists()


def test_config_file_values_are_checked_and_yaml_numbers_still_read(cache, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lr": "1e-4", "epochs": -1, "batch_size": 8}))
    refused(capsys, [*fit_args(cache, out, tiny_lm_dir), "--config", str(config)], "epochs: ", "got -1")
    assert not out.exists()
    config.write_text("lr: 1e-4\nmax_steps: 2\n")  # YAML 1.1 leaves 1e-4 a string: still the number
    assert main([*fit_args(cache, out, tiny_lm_dir), "--config", str(config), "lr=2e-3"]) == 0
    saved = yaml.safe_load((out / "checkpoint" / "config.yaml").read_text())
    assert saved["lr"] == 2e-3 and saved["max_steps"] == 2


def test_a_changed_config_is_refused_then_accepted_and_recorded_truthfully(cache, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fit_args(cache, out, tiny_lm_dir, "max_steps=2")) == 0
    capsys.readouterr()
    before = snapshot(out)

    err = refused(capsys, fit_args(cache, out, tiny_lm_dir, "max_steps=4", "lr=2e-3", "model.num_beams=1"),
                  "(step 2)", "lr 0.001 -> 0.002", "max_steps 2 -> 4", "model.num_beams (unset) -> 1",
                  "--allow-config-change")
    assert "num_workers" not in err and "out " not in err
    assert snapshot(out) == before  # the refusal wrote nothing: checkpoint, config.yaml and log as they were

    # how it runs, not what it trains: resumes without the flag (nothing left to train at step 2)
    assert main(fit_args(cache, out, tiny_lm_dir, "max_steps=2", "num_workers=1", "log_every=5")) == 0
    capsys.readouterr()

    assert main([*fit_args(cache, out, tiny_lm_dir, "max_steps=4", "lr=2e-3"), "--allow-config-change"]) == 0
    printed = capsys.readouterr().out
    assert "resuming with a changed config" in printed and "lr 0.001 -> 0.002" in printed
    info = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert info["step"] == 4
    assert info["config_changes"] == [
        {"step": 2, "changes": {"log_every": {"from": 1, "to": 5}, "num_workers": {"from": 0, "to": 1}}},
        {"step": 2, "changes": {"log_every": {"from": 5, "to": 1}, "lr": {"from": 1e-3, "to": 2e-3},
                                "max_steps": {"from": 2, "to": 4}, "num_workers": {"from": 1, "to": 0}}},
    ]
    saved = yaml.safe_load((out / "checkpoint" / "config.yaml").read_text())
    assert (saved["lr"], saved["max_steps"]) == (2e-3, 4)
    # the new values really trained: the schedule ran on to step 4 with the new peak rate (warmup 1,
    # cosine to min_lr over 4 steps: step 3's rate is 2e-3 scaled by the cosine at 2 of 3 steps)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = {record["step"]: record["lr"] for record in log if "lr" in record}
    assert sorted(rates) == [1, 2, 3, 4]
    import math

    floor = 1e-6 / 2e-3
    assert rates[3] == pytest.approx(2e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 2 / 3))))

    # the record now matches: the same config resumes without the flag
    assert main(fit_args(cache, out, tiny_lm_dir, "max_steps=4", "lr=2e-3")) == 0


def test_out_naming_a_file_is_one_line(cache, tiny_lm_dir, tmp_path, capsys):
    target = tmp_path / "not-a-dir"
    target.write_text("keep me\n")
    refused(capsys, fit_args(cache, target, tiny_lm_dir, "max_steps=2"), f"out: {target} is a file")
    refused(capsys, fit_args(cache, target / "run", tiny_lm_dir, "max_steps=2"), f"out: {target} is a file")
    assert main(fit_args(cache, tmp_path / "run", tiny_lm_dir, "max_steps=2")) == 0
    capsys.readouterr()
    for command in ("eval", "predict"):
        refused(capsys, [command, "--cache", str(cache), "--checkpoint", str(tmp_path / "run" / "checkpoint"),
                         "--split", "val", "--out", str(target)], f"out: {target} is a file")
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("method,key", [("epalm", "model.lm"), ("prismer", "model.vision"), ("mope", "model.encoder")])
def test_a_missing_local_model_path_is_not_taken_for_a_hub_id(cache, tiny_lm_dir, tmp_path, capsys, monkeypatch,
                                                               method, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    out = tmp_path / "run"
    for ref in ["/no/such/dir/opt", "./missing-model", "~/no-such-model-dir-here", "models/missing"]:
        args = [a for a in fit_args(cache, out, tiny_lm_dir, "max_steps=2") if not a.startswith("model.")]
        args += ["--method", method, f"{key}={ref}"]
        refused(capsys, args, f"{key}: {ref} does not exist (a local path")
    assert not out.exists()


def test_a_hub_id_not_in_the_offline_cache_is_one_line(cache, tmp_path):
    """A fresh, empty Hugging Face cache and HF_HUB_OFFLINE=1: the hub id cannot load, which is
    said in one line naming it (before: transformers' multi-line OSError in a traceback)."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([*CLI, *fit_args(cache, out, Path("x"), "max_steps=2"), "model.lm=facebook/opt-125m"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.lm: facebook/opt-125m" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv, documented", [
    (["--help"], ["trainer fit", "trainer eval", "trainer predict", "trainer config", "Exit code 2 on bad input"]),
    (["fit", "--help"], ["--allow-config-change", "--max-steps", "(default: ./cache)", "(default: epalm)",
                         "(default: ./runs/run)", "Default: 1, in this process", "at most max_failures times (default 3)"]),
    (["eval", "--help"], ["(default: ./cache)", "(default: the config's eval_split)", "(default: the checkpoint directory)"]),
    (["predict", "--help"], ["(default: ./cache)", "(default: the config's eval_split)"]),
    (["config", "--help"], ["(default: epalm)"]),
])
def test_help_of_every_command_states_its_defaults(tmp_path, argv, documented):
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert [phrase for phrase in documented if phrase not in text] == []


def test_config_lists_every_key_with_its_default_and_description(tmp_path):
    from trainer.config import TrainConfig

    result = subprocess.run([*CLI, "config", "--method", "mope"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()}
    assert set(TrainConfig.__pydantic_fields__) <= set(rows)
    assert rows["lr"] == ["0.0001", "peak learning rate (AdamW, after warmup)"]
    assert rows["method"][0] == '"mope"' and rows["log_to"][0] == '["jsonl"]'
    assert rows["model.num_experts"][0] == "16" and rows["model.temperature"][0] == "0.1"
    assert "model.num_classes" not in rows  # the cache decides it
    prismer = subprocess.run([*CLI, "config", "--method", "prismer"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "model.augment.randaugment_ops" in prismer.stdout

@pytest.mark.parametrize("method", ["epalm", "prismer", "mope"])
def test_config_lists_each_model_key_the_method_takes_with_its_default(method, capsys):
    """`trainer config --method M`'s model.* rows are the keys the method accepts: each has a
    description, and giving every listed default back as KEY=VALUE makes the method's default options."""
    from trainer.config import apply_overrides, check_options
    from trainer.methods import method_class

    assert main(["config", "--method", method]) == 0
    # columns are padded apart by at least two spaces; a JSON value has none in a row
    rows = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert rows and all(len(row) == 3 for row in rows), [row for row in rows if len(row) != 3]  # every key described
    required = {"model.lm": "x"} if method == "epalm" else {}
    assert [key for key, default, _ in rows if default == "(required)"] == list(required)
    overrides = [f"{key}={default}" for key, default, _ in rows if default not in ("(required)", "{...}")]
    overrides += [f"{key}={value}" for key, value in required.items()]
    options = method_class(method).Options
    given = check_options(options, apply_overrides({}, overrides)["model"], "model.")
    assert given == check_options(options, {key.removeprefix("model."): value for key, value in required.items()}, "model.")
    listed = {key.removeprefix("model.").partition(".")[0] for key, _, _ in rows}
    assert listed == set(options.model_fields)
    with pytest.raises(ConfigError, match="unknown key"):
        check_options(options, {**{key.removeprefix("model."): v for key, v in required.items()}, "not_a_key": 1}, "model.")



