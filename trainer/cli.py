"""`trainer`: train the small parts of a method against a feature cache, and score them.

    trainer fit  --cache DIR --method epalm|mope|prismer [--config FILE] [--out DIR] [--max-steps N]
                 [--workers N] [--address auto|HOST:PORT] [--allow-config-change] [KEY=VALUE ...]
    trainer eval --cache DIR --checkpoint DIR [--split S] [KEY=VALUE ...]
    trainer predict --cache DIR --checkpoint DIR --split S
    trainer config [--method epalm|mope|prismer]     every key, its default and what it does

Any config key can be overridden with KEY=VALUE (nested with dots: model.variant=lin); every
value is checked against its type and range before anything runs.
`batch_size` is the global batch: with --workers N (Ray Train, DDP) each worker takes batch_size/N.
`fit` into an OUT that holds a checkpoint resumes it, with the config it was made with: a different
one is refused unless --allow-config-change (then recorded in checkpoint.json's config_changes).
Runs read only the cache: no raw images, no encoder weights. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cache_schema.console import show_messages
from trainer.config import ConfigError
from trainer.errors import USER_ERRORS
from trainer.methods import METHODS

logger = logging.getLogger("trainer.cli")  # not __name__: run as `python -m trainer.cli` that is "__main__"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fit", help="train; resumes from OUT/checkpoint when one exists")
    p.add_argument("--cache", help="feature cache directory or fsspec URL, e.g. s3://bucket/cache (default: ./cache)")
    p.add_argument("--method", choices=sorted(METHODS), help="training method (default: epalm)")
    p.add_argument("--config", help="YAML config file; KEY=VALUE arguments override it")
    p.add_argument("--out", help="run directory: checkpoint/, log.jsonl (default: ./runs/run)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: `epochs` worth)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="data-parallel training on N Ray Train workers (DDP; one GPU each when the cluster has GPUs, "
                        "else CPU with gloo); batch_size stays the global batch and must be a multiple of N; after a "
                        "lost worker every rank restarts from the last checkpoint, at most max_failures times (default "
                        "3). Default: 1, in this process")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="run the workers on this Ray cluster (auto: the one this machine belongs to), even with one "
                        "worker; OUT must be on storage every node sees. Default: a private local Ray when --workers > 1")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume OUT's checkpoint although the config differs from the one it was made with; the "
                        "new values apply from the resumed step and checkpoint.json records the change. Default: "
                        "refuse, naming the keys (num_workers, log_every, log_to, device and max_failures may always change)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=3e-4 model.variant=lin")
    for name, help_text in (("eval", "score a checkpoint on a split; prints metrics, writes metrics.json"),
                            ("predict", "write predictions for a split without scoring (e.g. an unlabelled test split)")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--cache", default="./cache", help="feature cache directory or fsspec URL, e.g. s3://bucket/cache (default: ./cache)")
        p.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (OUT/checkpoint)")
        p.add_argument("--split", help="split to use (default: the config's eval_split)")
        p.add_argument("--out", help="where metrics.json / predictions go (default: the checkpoint directory)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.num_beams=1")
    p = commands.add_parser("config", help="every config key with its default and what it does")
    p.add_argument("--method", choices=sorted(METHODS), default="epalm", help="whose model.* keys to list (default: epalm)")
    return parser


def describe_config(method: str) -> str:
    """`trainer config`: each key, its default, and its description; then the method's model.* keys
    (its Options' fields, a nested section's keys under its name)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from trainer.config import TrainConfig
    from trainer.methods import method_class

    def show(value: object) -> str:
        return "(required)" if value is PydanticUndefined else json.dumps(value, default=str)

    def rows_of(prefix: str, fields: dict) -> list[tuple[str, str, str]]:
        rows = []
        for name, info in fields.items():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                rows.append((f"{prefix}{name}", "{...}", info.description or ""))
                rows += rows_of(f"{prefix}{name}.", type(default).model_fields)
            else:
                rows.append((f"{prefix}{name}", show(default), info.description or ""))
        return rows

    rows = [(name, json.dumps(method) if name == "method" else value, text)  # the listing is of this method
            for name, value, text in rows_of("", TrainConfig.__pydantic_fields__)]
    rows += rows_of("model.", method_class(method).Options.model_fields)
    width = max(len(name) for name, _, _ in rows) + 2, max(len(value) for _, value, _ in rows) + 2
    return "\n".join(f"{name:<{width[0]}}{value:<{width[1]}}{text}".rstrip() for name, value, text in rows)


def check_out_dir(out: str | Path) -> None:
    """A run directory must be a directory, or creatable as one, and writable; checked before any
    work so a wrong --out is one line rather than a traceback after the model has loaded."""
    path = Path(out).expanduser()
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"out: {existing} is a file, not a directory" + ("" if existing == path else f" (in {out})"))
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: {existing} is not writable" + ("" if existing == path else f" (to create {out})"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may also follow the flags; anything else left over is an error
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "config":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        print(describe_config(args.method))
        return 0
    args.overrides = [*args.overrides, *extra]
    from trainer.checkpoint import check_resume, show
    from trainer.config import load_config
    from trainer.loop import evaluate_checkpoint, fit

    show_messages("trainer", "stdout")
    try:
        if args.command == "fit":
            config = load_config(args.config, args.overrides, cache=args.cache, method=args.method, out=args.out,
                                 max_steps=args.max_steps)
            check_out_dir(config.out)
            changes = check_resume(Path(config.out), config, args.allow_config_change)
            if changes:
                logger.info("resuming with a changed config (recorded in checkpoint.json's config_changes): " +
                            ", ".join(f"{key} {show(old)} -> {show(new)}" for key, (old, new) in changes.items()))
            workers = args.workers or 1
            if workers == 1 and args.address is None:
                metrics = fit(config, progress=not args.no_progress, allow_config_change=args.allow_config_change)
            else:
                from trainer.distributed import fit_distributed

                metrics = fit_distributed(config, workers, args.address, progress=not args.no_progress)
        else:
            if args.out:
                check_out_dir(args.out)
            out = Path(args.out) if args.out else None
            metrics = evaluate_checkpoint(args.cache, Path(args.checkpoint), args.split, args.overrides, out,
                                          score=args.command == "eval")
    except USER_ERRORS as e:
        print(f"trainer {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
