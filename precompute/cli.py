"""`precompute`: run frozen experts over a dataset into a feature cache, and inspect the cache.

Exit codes: 0 success; 1 some shards failed (the rest are committed; run again to retry them),
`validate` found a problem or shards still pending, or `verify` found stored values the live model
does not reproduce; 2 bad input (unknown expert/source, missing data root, malformed annotations,
spec mismatch, including a model or preprocessing that changed since the cache was made, an option
out of range, a cache location that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from cache_schema import PROFILE_STAGES, CacheError, CacheLayout, SpecMismatchError, SplitReader, list_splits, pending_shards, validate_cache
from cache_schema.commit import gap_category
from cache_schema.console import show_messages
from precompute.experts import ALIASES, EXPERTS, TYPE_NAMES, ExpertError, expand_experts, expert_class, scope_options
from precompute.sources import SOURCES, SourceError

logger = logging.getLogger("precompute.cli")  # not __name__: run as `python -m precompute.cli` that is "__main__"


class UsageError(Exception):
    """A command-line value out of its range (argparse checks only that it parses)."""


USER_ERRORS = (SourceError, ExpertError, CacheError, SpecMismatchError, UsageError)


def parse_options(pairs: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; values parse as YAML scalars so `num=200` is an int. A value YAML cannot
    read (a glob such as `*.tar`) is taken as the string it is."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SourceError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key] = value
    return options


def split_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE pairs as the text typed: expert options are typed by each expert's defaults
    (`precompute.experts.option_value`), so `field=yes` stays the string it is."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ExpertError(f"{flag} expects KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


# Run options that count something: (flag, attribute, least allowed value).
RUN_COUNTS = (("--shard-size", "shard_size", 1), ("--batch-size", "batch_size", 1), ("--limit", "limit", 1),
              ("--workers", "workers", 1), ("--retries", "retries", 0), ("--decode-threads", "decode_threads", 1))


def check_run_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range counts and an unwritable cache location before any work or write.

    A batch size below 1 would commit every shard with no sample processed and no reason given;
    a limit below 1 would plan a silently cut split.
    """
    for flag, attribute, least in RUN_COUNTS:
        value = getattr(args, attribute)
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    CacheLayout(args.cache).require_writable()


def parse_models(values: list[str], experts: list[str]) -> dict[str, str]:
    """`--model X` (one expert) or `--model EXPERT=X` (any number) to {expert: X}."""
    models = {}
    for value in values:
        name, sep, ref = value.partition("=")
        if sep and name in experts:
            models[name] = ref
        elif len(experts) == 1 and not (sep and name in EXPERTS):
            models[experts[0]] = value
        else:
            raise ExpertError(f"--model {value!r}: with experts {', '.join(experts)} write --model EXPERT=ID_OR_PATH for one of them")
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="precompute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("run", help="run experts over a source split into the cache (resumes: only uncommitted shards run)")
    p.add_argument("--expert", required=True,
                   help="expert name(s), comma-separated, or `prismer` for all of Prismer's; see `precompute experts`")
    p.add_argument("--shards", required=True, metavar="SOURCE", help="source to read; see `precompute sources`")
    p.add_argument("--data-root", help="dataset directory in the source's published layout (not needed for `shapes`)")
    p.add_argument("--split", help="source split, or several comma-separated (`train,val,test`: one Ray start and "
                                  "one model load per expert for all of them) (default: train, or the source's only "
                                  "split, e.g. `all` for images)")
    p.add_argument("--cache", default="./cache", help="cache directory or fsspec URL, e.g. s3://bucket/cache (default: ./cache)")
    p.add_argument("--model", action="append", default=[], metavar="[EXPERT=]ID_OR_PATH",
                   help="hub id, timm name or local path (default: each expert's default); with several experts, "
                        "EXPERT=ID_OR_PATH, repeatable")
    p.add_argument("--format", choices=["zarr", "wds"], default="zarr",
                   help="how features are stored: zarr arrays (random access) or wds, WebDataset tar shards "
                        "(one per precompute shard, to stream from object stores) (default: zarr)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard = per Zarr storage shard (default: 256)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default: 32)")
    p.add_argument("--limit", type=int, help="only the first N samples of the split")
    p.add_argument("--address", help="Ray cluster to join: `auto` or HOST:PORT (default: start Ray locally on 127.0.0.1)")
    p.add_argument("--workers", type=int, help="actors (default: one per GPU; without GPUs one per node, each using "
                                                   "its share of the node's CPUs as torch threads)")
    p.add_argument("--decode-threads", type=int, help="threads per actor that decode and preprocess samples ahead of "
                   "the forward (default: the CPUs the actor gets, at least 2; JPEG decode and tensor resizes release "
                   "the GIL, so they scale with the threads)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a failed shard (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a feature (or shard plan) made with a different spec")
    p.add_argument("--source-opt", action="append", default=[], metavar="KEY=VALUE", help="source option, e.g. num=500 (repeatable)")
    p.add_argument("--expert-opt", action="append", default=[], metavar="[EXPERT.]KEY=VALUE",
                   help="expert option, e.g. resolution=64 (every expert that takes it) or ocrdet.min_confidence=0.3 "
                        "(repeatable; see `precompute experts`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    cache_help = "cache directory or fsspec URL to read (default: ./cache)"
    p = commands.add_parser("status", help="what is done, pending and failed per split and feature; samples/s; "
                            "how many nodes wrote its shards; how many samples are gaps and why")
    p.add_argument("--cache", default="./cache", help=cache_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (with every gap's key and reason)")
    p.add_argument("--profile", action="store_true", help="also print where the shards' time went, per stage (decode, "
                   "preprocess, wait, forward, write seconds, from the commit records)")

    p = commands.add_parser("validate", help="re-check every committed shard's checksum and gap reasons and list "
                            "pending shards; exit 0 only for a complete, intact cache")
    p.add_argument("--cache", default="./cache", help=cache_help)
    p.add_argument("--allow-pending", action="store_true",
                   help="check only the committed shards: exit 0 if they check out, whatever is still pending")

    p = commands.add_parser("preview", help="write a PNG grid of one sample's image and its labels, colour-mapped")
    p.add_argument("--cache", default="./cache", help=cache_help)
    p.add_argument("--key", required=True, help="sample key (see samples.jsonl), e.g. shapes-val-000003")
    p.add_argument("--split", metavar="SOURCE/SPLIT", help="where to look (default: every split of the cache)")
    p.add_argument("--out", help="PNG path (default: preview-KEY.png)")

    p = commands.add_parser("verify", help="re-run a feature's expert (model and preprocessing from its spec) on a "
                            "seeded random subset of committed samples and compare with the cache; exit 1 when values "
                            "differ beyond the stored dtype's tolerance, 2 when the model or preprocessing changed")
    p.add_argument("--cache", default="./cache", help=cache_help)
    p.add_argument("--feature", required=True, help="feature to check (the expert's name, e.g. vit-cls; see `precompute status`)")
    p.add_argument("--split", metavar="[SOURCE/]SPLIT", help="where to look (default: the only split that holds the feature)")
    p.add_argument("--samples", type=int, default=64, help="how many committed samples to re-run (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset (default: 0)")
    p.add_argument("--data-root", help="the dataset (default: the data root the run recorded)")
    p.add_argument("--source-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="source option (default: the options the run recorded; repeatable)")
    p.add_argument("--expert-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="expert option (default: the options the run recorded; for caches written before runs recorded "
                        "them; repeatable)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default: 32)")

    commands.add_parser("experts", help="registered experts with their default models and options")
    commands.add_parser("sources", help="registered sources with their splits and whether they need --data-root")
    return parser


def print_summary(summaries: list) -> None:
    print(f"\n{'expert':<14}{'shards':>8}{'skipped':>9}{'done':>6}{'failed':>8}{'samples':>9}{'invalid':>9}{'samples/s':>11}"
          f"{'nodes':>7}")
    for s in summaries:
        print(f"{s.expert:<14}{s.shards_total:>8}{s.shards_skipped:>9}{s.shards_done:>6}{len(s.shards_failed):>8}"
              f"{s.samples:>9}{s.invalid:>9}{s.samples_per_s:>11.1f}{len(s.nodes):>7}")
    for s in summaries:
        if s.shards_failed:
            logger.warning(f"{s.expert}: failed shards {s.shards_failed}; see _failures/ in the cache and run again to retry")


def command_run(args: argparse.Namespace) -> int:
    check_run_args(args)
    from precompute.engine import InfrastructureError, RunConfig, run_splits  # torch, timm and Ray: only when there is work
    from precompute.sources import resolve_split, split_names

    experts = expand_experts([e.strip() for e in args.expert.split(",") if e.strip()])
    # every split is checked before the first one runs: a typo in the last must not come after hours of work
    splits = [resolve_split(args.shards, split) for split in split_names(args.shards, args.split)]
    config = RunConfig(
        experts=experts, source=args.shards, data_root=args.data_root, split=splits[0], cache=args.cache, format=args.format,
        models=parse_models(args.model, experts), shard_size=args.shard_size, batch_size=args.batch_size, limit=args.limit,
        address=args.address, overwrite=args.overwrite, workers=args.workers, retries=args.retries,
        decode_threads=args.decode_threads,
        source_options=parse_options(args.source_opt, "--source-opt"),
        expert_options=scope_options(split_pairs(args.expert_opt, "--expert-opt"), experts),
    )
    try:  # one Ray start, and each expert's model loaded once, for every split
        by_split = run_splits(config, splits, progress=not args.no_progress)
    except InfrastructureError as e:  # a Ray worker or node died: not bad input, and a rerun resumes
        print(f"precompute run: error: {e}", file=sys.stderr)
        return 1
    failed = False
    for split, summaries in by_split.items():
        if len(splits) > 1:
            print(f"\n{args.shards}/{split}:", end="")
        print_summary(summaries)
        # the source's notes and problems, as planning recorded them
        info = SplitReader(args.cache, args.shards, split).header.get("source_info", {})
        for line in info.get("notes", []):
            logger.info(f"{args.shards}: {line}")
        for line in info.get("problems", []):
            logger.warning(f"{args.shards}: {line}")
        failed |= bool(info.get("problems")) or any(s.shards_failed for s in summaries)
    return 1 if failed else 0


def cache_status(cache: str) -> list[dict[str, Any]]:
    rows = []
    for source, split in list_splits(cache):
        reader = SplitReader(cache, source, split)
        for feature in reader.feature_names:
            reader_feature = reader.feature(feature)
            records = list(reader_feature.commit_records().values())
            failed = sorted(int(p.stem) for p in (reader.dir / "_failures" / feature).glob("*.json"))
            seconds = sum(r.seconds for r in records)
            samples = sum(r.num_samples for r in records)
            gaps = {key: reason for r in records for key, reason in r.invalid.items()}
            profile = {stage: round(sum(r.profile.get(stage, 0.0) for r in records), 3) for stage in PROFILE_STAGES}
            reasons: dict[str, int] = {}
            for reason in gaps.values():
                reasons[gap_category(reason)] = reasons.get(gap_category(reason), 0) + 1
            rows.append({
                "split": f"{source}/{split}", "feature": feature, "format": reader_feature.format, "shards": reader.num_shards,
                "done": len(records), "pending": reader.num_shards - len(records), "failed": failed,
                "samples": samples, "invalid": sum(r.num_samples - r.num_valid for r in records),
                "invalid_reasons": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
                "samples_per_s": round(samples / seconds, 2) if seconds else 0.0,
                "nodes": len({(r.host, r.node) for r in records}),  # machines / Ray nodes that wrote its shards
                "gaps": gaps,  # every invalid sample's key and the reason its shard recorded
                # seconds per stage over the shards whose records have a profile (older ones do not)
                "profile": profile, "profiled_shards": sum(1 for r in records if r.profile),
                "bound_by": bound_by(profile),
                # what the source could not read at planning (a damaged tar), never in any shard
                "source_problems": reader.header.get("source_info", {}).get("problems", []),
            })
    return rows


# The forward loop's own time is spent in one of these stages; `wait` is time it had no decoded
# samples to run, so a run where it dominates is bound by decoding (and preprocessing).
BOUND_NAMES = {"wait": "decode", "forward": "forward", "write": "write"}


def bound_by(profile: dict[str, float]) -> dict[str, Any] | None:
    """The stage that took the largest share of the shards' time (decode, forward or write) and
    that share, or None without profiled shards."""
    spent = {name: profile.get(stage, 0.0) for stage, name in BOUND_NAMES.items()}
    total = sum(spent.values())
    if not total:
        return None
    stage = max(spent, key=spent.__getitem__)
    return {"stage": stage, "share": round(spent[stage] / total, 3)}


def command_status(args: argparse.Namespace) -> int:
    rows = cache_status(args.cache)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'split':<20}{'feature':<14}{'format':>7}{'shards':>7}{'done':>6}{'pending':>8}{'failed':>7}{'samples':>9}{'invalid':>8}"
          f"{'samples/s':>10}{'nodes':>7}  bound by")
    for r in rows:
        bound = f"{r['bound_by']['stage']} {r['bound_by']['share']:.0%}" if r["bound_by"] else "-"
        print(f"{r['split']:<20}{r['feature']:<14}{r['format']:>7}{r['shards']:>7}{r['done']:>6}{r['pending']:>8}{len(r['failed']):>7}"
              f"{r['samples']:>9}{r['invalid']:>8}{r['samples_per_s']:>10.1f}{r['nodes']:>7}  {bound}")
    if args.profile:
        print_profile(rows)
    for r in rows:
        if r["invalid"]:
            counts = ", ".join(f"{count} {reason}" for reason, count in r["invalid_reasons"].items())
            print(f"{r['split']} {r['feature']}: {r['invalid']} invalid: {counts}")
    for split, problems in {r["split"]: r["source_problems"] for r in rows}.items():
        for problem in problems:
            print(f"{split}: not in the cache: {problem}")
    return 0


def print_profile(rows: list[dict[str, Any]]) -> None:
    """Seconds per stage, summed over each feature's profiled shards. Decode and preprocess are
    thread-seconds of the decode pool (they run in parallel with the rest); wait, forward and write
    are the shard's own time: wait is the forward idle for want of decoded samples."""
    print(f"\n{'split':<20}{'feature':<14}{'shards':>7}" + "".join(f"{stage + ' s':>13}" for stage in PROFILE_STAGES))
    for r in rows:
        print(f"{r['split']:<20}{r['feature']:<14}{r['profiled_shards']:>7}"
              + "".join(f"{r['profile'][stage]:>13.2f}" for stage in PROFILE_STAGES))
    print("decode and preprocess: seconds summed over the decode threads; wait: the forward idle, waiting for them")


def command_validate(args: argparse.Namespace) -> int:
    """Exit 0 only for a complete, intact cache (with --allow-pending: intact committed shards)."""
    checked, problems = validate_cache(args.cache)
    pending = pending_shards(args.cache)
    for problem in problems:
        print(problem, file=sys.stderr)
    for item in pending:
        print(f"pending: {item}", file=sys.stderr)
    count = sum(len(item.pending) for item in pending)
    print(f"{checked} committed shards checked, {len(problems)} problems" + (f", {count} shards pending" if pending else ""))
    if pending and not args.allow_pending and not problems:
        print("the cache is incomplete: run the same `precompute run` again to finish it, or pass --allow-pending "
              "to check only what is committed", file=sys.stderr)
    return 1 if problems or (pending and not args.allow_pending) else 0


def command_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every compared sample is within tolerance, 1 naming the worst ones otherwise."""
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    from precompute.verify import tolerance_text, verify_feature  # torch and the expert's libraries: only here

    result = verify_feature(args.cache, args.feature, args.split, args.samples, args.seed, args.data_root,
                            parse_options(args.source_opt, "--source-opt"), split_pairs(args.expert_opt, "--expert-opt"),
                            args.batch_size)
    spec = result.spec
    print(f"{result.source}/{result.split} {spec.name}: {len(result.keys)} of {result.committed} committed samples "
          f"(seed {result.seed})")
    print(f"  model {spec.model_id} ({spec.revision}), preprocessing {spec.preprocess_hash}: as the spec records")
    print(f"  cache made on: {', '.join(result.made_on)}; verified on: {result.verified_on}")
    print(f"{'array':<12}{'dtype':>9}{'samples':>9}{'max|diff|':>11}{'mean cos':>10}{'equal':>9}{'outside':>9}  tolerance")
    for report in result.arrays:
        cosine = "-" if report.mean_cosine is None else f"{report.mean_cosine:.6f}"
        equal = "-" if report.match_rate is None else f"{report.match_rate:.2%}"
        print(f"{report.name:<12}{report.dtype:>9}{len(report.samples):>9}{report.max_abs_error:>11.3g}{cosine:>10}"
              f"{equal:>9}{len(report.failed):>9}  {tolerance_text(report.dtype)}")
    if result.passed:
        print(f"verify: {spec.name} matches the live model on {len(result.keys)} samples")
        return 0
    print(f"precompute verify: {result.source}/{result.split} {spec.name} does NOT match the live model:", file=sys.stderr)
    for report in result.arrays:
        if report.failed:
            worst = ", ".join(s.describe() for s in report.failed[:5])
            print(f"  {report.name}: {len(report.failed)} of {len(report.samples)} samples outside tolerance; worst: {worst}",
                  file=sys.stderr)
    if result.now_gaps:
        gaps = ", ".join(f"{key} ({reason})" for key, reason in list(result.now_gaps.items())[:5])
        print(f"  {len(result.now_gaps)} sample(s) valid in the cache no longer decode: {gaps}", file=sys.stderr)
    return 1


def command_experts(_: argparse.Namespace) -> int:
    """Each expert, its default model, and each option (`--expert-opt KEY=VALUE`) with its default,
    its type (a value of another type is refused) and what it changes."""
    for name in sorted(EXPERTS):
        cls = expert_class(name)
        print(f"{name:<12} {cls.description}\n{'':<12} default model: {cls.default_model}")
        for key, default in cls.options.items():
            print(f"{'':<12} {f'{key}={default}':<22} {cls.option_help[key]} ({TYPE_NAMES[type(default)]})")
        if not cls.options:
            print(f"{'':<12} no options")
    for alias, members in ALIASES.items():
        print(f"{alias:<12} all of: {', '.join(members)} (run in dependency order)")
    return 0


def command_sources(_: argparse.Namespace) -> int:
    for name, cls in sorted(SOURCES.items()):
        root = "needs --data-root" if cls.needs_data_root else "no data root"
        print(f"{name:<10} {cls.description}\n{'':<10} splits: {', '.join(cls.splits)}; {root}")
    return 0


def command_preview(args: argparse.Namespace) -> int:
    from precompute.preview import preview

    print(preview(args.cache, args.key, args.out or f"preview-{args.key}.png", args.split))
    return 0


COMMANDS = {"run": command_run, "preview": command_preview, "status": command_status, "validate": command_validate,
            "verify": command_verify, "experts": command_experts, "sources": command_sources}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_messages("precompute", "stderr")  # stdout is the command's own output: tables, JSON
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"precompute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
