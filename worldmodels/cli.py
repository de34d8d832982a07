"""`pretrain-shapes`: train the embedded worlds' stand-in models and hold each to its bar.

Exit 0: every model saved and (default runs) every gate passed. Exit 2: bad input, one line,
nothing written. Exit 1: a model missed its bar (one line per miss; every model and pretrain.json
are still written, so the numbers can be read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NoReturn

from cache_schema.console import show_messages
from worldmodels import WORLDS

PROG = "pretrain-shapes"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage text plus the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Train the shapes worlds' tiny stand-in models (ViT, OPT, RoBERTa, DPT, Mask2Former, RT-DETR, "
                    "TimeSformer) on CPU, save them where the precompute experts and the trainer load them by path, "
                    "and check each model's held-out score against the bar it states. Exits 1, one line per miss, "
                    "when a default run leaves a model under its bar (pretrain.json is still written).",
    )
    parser.add_argument("--out", required=True,
                        help="directory for vit/, lm/, roberta/, depth/, seg/, objdet/, timesformer/ and pretrain.json")
    parser.add_argument("--seed", type=int, default=0, help="the worlds' and the models' seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="the world's image size in pixels, a multiple of 32 (default: 64)")
    parser.add_argument("--world", choices=WORLDS, default="tabletop",
                        help="the image world the models are for: tabletop (jobs/findings.sh's; its ViT is pretrained on "
                             "captions only) or shapes (the main job's; its ViT learns what the questions ask) "
                             "(default: tabletop)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes training models side by side, one thread each; the models are independent "
                             f"and the bytes are the same for any number (default: the usable CPUs, {default_workers()} here)")
    parser.add_argument("--models", default=None,
                        help="comma-separated models to make, of vit, lm, roberta, depth, seg, objdet, normal (tabletop "
                             "only), timesformer, ocr (the OCR expert's check) (default: all; pretrain.json then holds "
                             "only these)")
    parser.add_argument("--fast", action="store_true",
                        help="a few seconds of training, for tests: models near chance, gates recorded as not applied")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.image_size < 32 or args.image_size % 32:
        parser.error(f"--image-size must be a positive multiple of 32 (Swin's deepest stride), got {args.image_size}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")

    from worldmodels.gates import QualityGateError
    from worldmodels.pretrain import model_names, pretrain_all

    only = None
    if args.models is not None:
        only = [name.strip() for name in args.models.split(",") if name.strip()]
        unknown = [name for name in only if name not in model_names(args.world)]
        if not only or unknown:
            parser.error(f"--models: expected names of {', '.join(model_names(args.world))}, got {args.models!r}")

    show_messages("worldmodels", "stderr")  # stdout is the command's own output: the models' paths, JSON

    try:
        paths = pretrain_all(out, seed=args.seed, image_size=args.image_size, fast=args.fast, world=args.world,
                             workers=args.workers, only=only)
    except QualityGateError as e:
        for line in e.lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    except BrokenProcessPool as e:
        print(f"{PROG}: a worker process died ({e}); rerun, or --workers 1 to train in this process", file=sys.stderr)
        return 1
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
