"""Training step time: from the cache, with the ViT run online, and the LM step with no data at all.

Measured side by side in one process, on one eP-ALM model (the trainer's own `EPALMMethod`: a
frozen OPT, trainable connections + soft prompt), one optimizer and the same batches:

- cached:  the trainer's data path, as `trainer.loop.fit` runs it: a real Zarr cache of [CLS]
           stacks read by `split.torch_dataset`, a DataLoader with `num_workers` workers, `EpochSampler`
           and `EPALMMethod.collate`; then forward, backward, gradient clipping and an AdamW step.
- online:  the same, but the DataLoader's items carry PNG-encoded 64x64 images instead of cached
           features: its workers decode and preprocess them (the ViT's transform, to 224 px), and
           each step runs the frozen ViT (no grad) to get the [CLS] of its last 6 blocks first.
           Decoding in the workers is the most an online trainer can overlap; the ViT forward
           cannot leave the step.
- LM only: the very batches the cached run trained on, built beforehand and held in memory:
           the step alone. cached / LM only - 1 is what the data path costs.

The cache holds [CLS] tokens the same ViT computed from the same images (`vit-cls` expert, as
precompute writes them), so the online run must reproduce the cached inputs; it is checked.
Both models are built from their configs with random weights (no hub): timm
`vit_base_patch16_224` and an OPT sized like opt-125m. Weights do not change the time.

The modes run in rounds (ABC, CBA, ...), each from a fresh loader, so a slow spell of the
machine falls on all of them. A machine shared with other work slows a step at random: the CPU
ticks of this process and its DataLoader workers, and of everything else, are read from /proc
(Linux) around every step, and only quiet steps are compared.

    python bench/train_step.py            # ViT-B/16 + OPT-125m-sized decoder, batch 8
    python bench/train_step.py --small    # toy ViT and decoder: a quick check, overheads dominate
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from cache_schema import CacheWriter, SplitPlan, SplitReader
from cache_schema.torch_data import CacheDataset
from precompute.experts import get_expert
from precompute.experts.base import Expert
from precompute.sources import get_source
from trainer.config import TrainConfig
from trainer.data import EpochSampler
from trainer.loop import autocast, resolve_device
from trainer.methods.epalm_task import EPALMMethod
from trainer.methods.text import encode_batch
from vit_models import save_vit_base  # bench/ is on sys.path when a script here runs

EXPERT, SOURCE, SPLIT = "vit-cls", "shapes", "train"
LEVELS = 6
GOAL = 0.15  # the data path may add at most this share to the LM-only step
QUIET_CORES = 0.1  # a step is timed clean when the rest of the machine used less than this
MIN_QUIET_STEPS = 3  # per mode, for the ratios to come from quiet steps only


def save_tiny_vit(path: Path) -> str:
    """A toy timm ViT, 6 blocks (one per level), 32 px."""
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=LEVELS, num_heads=2, num_classes=4)
    model.pretrained_cfg = {
        "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center", "num_classes": 4, "architecture": "vit_tiny_patch16_224",
    }
    timm.models.save_for_hf(model, str(path), safe_serialization=True,
                            model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": LEVELS, "num_heads": 2})
    return str(path)


def save_lm(path: Path, words: list[str], small: bool) -> str:
    """An OPTForCausalLM sized like opt-125m (or a toy one) and a word-level tokenizer, by `save_pretrained`.

    The tokenizer knows only the shapes world's words; the LM keeps opt-125m's 50272-row
    vocabulary anyway, because the output projection over it is a real share of the step.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words) | set("?.,:")))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    size = (dict(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=12, ffn_dim=256, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=64)
            if small else
            dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                 max_position_embeddings=2048, word_embed_proj_dim=768))
    config = OPTConfig(**size, pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.1)
    OPTForCausalLM(config).save_pretrained(path)
    return str(path)


def write_cache(root: Path, expert: Expert, images: list[Image.Image], samples: list, batch_size: int) -> None:
    """The `vit-cls` feature of `images`, computed by `expert` and written through the cache contract (no Ray)."""
    plan = SplitPlan(SOURCE, SPLIT, [s.key for s in samples], [s.annotations for s in samples], shard_size=32)
    spec = expert.spec(EXPERT)
    writer = CacheWriter(root)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        began = time.perf_counter()
        cls = np.concatenate([
            expert.predict(torch.stack([expert.preprocess(image) for image in images[i : min(i + batch_size, stop)]]))["cls"]
            for i in range(start, stop, batch_size)
        ])
        writer.write_shard(SOURCE, SPLIT, spec, shard, start, plan.shard_keys(shard), {"cls": cls},
                           np.ones(stop - start, dtype=bool), {}, time.perf_counter() - began, str(expert.device))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class OnlineExamples(Dataset):
    """The cached run's examples, in the same order, with an encoded image where the cache has [CLS] tokens."""

    def __init__(self, cached: CacheDataset, encoded_images: list[bytes], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.cached, self.encoded_images, self.preprocess = cached, encoded_images, preprocess

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, example = self.cached.examples[i]
        image = Image.open(io.BytesIO(self.encoded_images[index])).convert("RGB")
        return {"key": self.cached.reader.keys[index], **example, "pixels": self.preprocess(image)}


def online_collate(method: EPALMMethod) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """`EPALMMethod.collate` with preprocessed pixels in place of cached [CLS] tokens."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = encode_batch(method.tokenizer, [item["prompt"] for item in items], [item["target"] for item in items],
                             method.options.max_length)
        batch["pixels"] = torch.stack([item["pixels"] for item in items])
        batch["items"] = [{k: v for k, v in item.items() if k != "pixels"} for item in items]
        return batch

    return collate


class CpuCounter:
    """CPU ticks used by this process and its children (the DataLoader workers), and by the machine, from /proc (Linux).

    Children are listed when the counter is made, so make one per timed run, after its workers
    have started; each reading then opens only a few small files.
    """

    def __init__(self) -> None:
        me, self.paths = os.getpid(), [Path("/proc/self/stat")]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == me:
                        self.paths.append(entry / "stat")
                except OSError:  # exited since the listing
                    pass

    def read(self) -> tuple[int, int]:
        """(ticks of ours so far, busy ticks of the whole machine so far)."""
        ours = 0
        for path in self.paths:
            try:
                fields = path.read_text().rpartition(")")[2].split()
            except OSError:  # a worker that exited keeps its last reading out of the count
                continue
            ours += int(fields[11]) + int(fields[12])  # utime + stime
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        return ours, user + nice + system + irq + softirq + steal


@dataclass
class Timing:
    """One mode's timed steps over all rounds: wall time, and the CPU ticks we and everything else used in each.

    A step counts as quiet when the rest of the machine used less than `QUIET_CORES` cores during it
    (or a single tick, the resolution): on 2 cores, one busy neighbour can stall the two OpenMP
    threads of a step several times over, so only quiet steps time the step itself.
    """

    name: str
    seconds: list[float] = field(default_factory=list)
    data_seconds: list[float] = field(default_factory=list)  # the part of each step spent in next(batches)
    our_ticks: list[int] = field(default_factory=list)
    other_ticks: list[int] = field(default_factory=list)

    def quiet(self) -> list[bool]:
        tick_rate = os.sysconf("SC_CLK_TCK")
        return [other <= max(1, QUIET_CORES * s * tick_rate) for s, other in zip(self.seconds, self.other_ticks)]

    def summary(self) -> dict[str, Any]:
        tick_rate, wall = os.sysconf("SC_CLK_TCK"), sum(self.seconds)
        quiet = [s for s, q in zip(self.seconds, self.quiet()) if q]
        quiet_data = [s for s, q in zip(self.data_seconds, self.quiet()) if q]
        return {"name": self.name, "steps": len(self.seconds), "quiet_steps": len(quiet),
                "ms_per_step": 1000 * statistics.mean(quiet) if quiet else None,
                "median_ms": 1000 * statistics.median(quiet) if quiet else None,
                "min_ms": 1000 * min(quiet) if quiet else None,
                "data_ms": 1000 * statistics.mean(quiet_data) if quiet else None,
                "all_steps_ms_per_step": 1000 * statistics.mean(self.seconds),
                "our_cores": sum(self.our_ticks) / tick_rate / wall, "other_cores": sum(self.other_ticks) / tick_rate / wall,
                "step_seconds": self.seconds, "step_data_seconds": self.data_seconds, "step_quiet": self.quiet()}


class Trainer:
    """One model, one optimizer: the inner step of `trainer.loop.fit` (grad_accum=1), and timed runs of it."""

    def __init__(self, method: EPALMMethod, model: torch.nn.Module, device: torch.device, config: TrainConfig):
        self.method, self.model, self.device, self.config = method, model, device, config
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(method.param_groups(model), weight_decay=config.weight_decay)

    def step(self, batch: dict[str, Any]) -> None:
        with autocast(self.device):
            loss = self.method.loss(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, timing: Timing, batches: Iterator[dict[str, Any]], step: Callable[[dict[str, Any]], None],
              warmup: int, steps: int) -> None:
        """`warmup` untimed steps (worker start-up, first batches), then `steps` timed ones added to `timing`.

        A timed step is `next(batches)` and `step(batch)`; the wait for the batch is also kept apart.
        """
        for _ in range(warmup):
            step(next(batches))
        self.synchronize()
        counter = CpuCounter()
        for _ in range(steps):
            ours0, busy0 = counter.read()
            began = time.perf_counter()
            batch = next(batches)
            timing.data_seconds.append(time.perf_counter() - began)
            step(batch)
            self.synchronize()
            timing.seconds.append(time.perf_counter() - began)
            ours1, busy1 = counter.read()
            timing.our_ticks.append(ours1 - ours0)
            timing.other_ticks.append(max(busy1 - busy0 - (ours1 - ours0), 0))


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    device = resolve_device("auto")
    batches_per_round = args.warmup + args.steps
    source = get_source(SOURCE, None, SPLIT, num=args.samples)
    samples = source.samples()
    images = [source.load_image(s) for s in samples]

    print("building the ViT and the decoder from their configs ...", flush=True)
    vit = save_tiny_vit(scratch / "vit") if args.small else save_vit_base(scratch / "vit")
    lm = save_lm(scratch / "lm", source.world.vocabulary() + ["question", "answer"], args.small)
    expert = get_expert(EXPERT, model=vit, device=str(device), levels=LEVELS)
    expert.load()

    print(f"cache: [CLS] of {len(samples)} images computed by the ViT ...", flush=True)
    write_cache(scratch / "cache", expert, images, samples, args.batch_size)

    config = TrainConfig(method="epalm", cache=str(scratch / "cache"), batch_size=args.batch_size,
                         num_workers=args.num_workers, model={"lm": lm, "task": "vqa"})
    method = EPALMMethod(config)
    reader = SplitReader(config.cache, SOURCE, SPLIT)
    method.check_cache(reader)
    model = method.build_model(reader).to(device)
    model.train()
    trainer = Trainer(method, model, device, config)
    cached_set = reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=True))
    if len(cached_set) < batches_per_round * args.batch_size:
        raise SystemExit(f"{len(cached_set)} examples from {args.samples} samples: fewer than {batches_per_round} "
                         f"batches of {args.batch_size}; raise --samples")
    online_set = OnlineExamples(cached_set, [png_bytes(image) for image in images], expert.preprocess)

    def loader(dataset: Dataset, collate: Callable) -> Iterator[dict[str, Any]]:
        """The trainer's loader at the start of an epoch: every run of every mode sees the same batches."""
        return iter(DataLoader(dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), config.seed),
                               collate_fn=collate, num_workers=config.num_workers, drop_last=True))

    in_memory = [batch for _, batch in zip(range(batches_per_round), loader(cached_set, method.collate))]
    online_inputs, vit_seconds = [], []

    def online_step(batch: dict[str, Any]) -> None:
        began = time.perf_counter()
        batch["visual"] = torch.from_numpy(expert.predict(batch.pop("pixels"))["cls"]).float()
        trainer.synchronize()
        vit_seconds.append(time.perf_counter() - began)
        online_inputs.append((batch["input_ids"], batch["visual"]))
        trainer.step(batch)

    modes = {  # name: (a fresh batch iterator, the step)
        "LM only": (lambda: iter(in_memory), trainer.step),
        "cached": (lambda: loader(cached_set, method.collate), trainer.step),
        "online": (lambda: loader(online_set, online_collate(method)), online_step),
    }
    timings = {name: Timing(name) for name in modes}
    for batch in in_memory[: args.warmup]:  # first-call allocations and the optimizer's state, outside every run
        trainer.step(batch)
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(modes)[::-1]
        print(f"round {round_index + 1}/{args.rounds}: {', '.join(order)}, {args.warmup} warm-up + {args.steps} "
              f"timed steps each ...", flush=True)
        for name in order:
            make_batches, step = modes[name]
            batches = make_batches()
            trainer.timed(timings[name], batches, step, args.warmup, args.steps)
            del batches  # shuts its DataLoader workers down before the next mode starts its own

    same_batches = all(torch.equal(ids, in_memory[i % batches_per_round]["input_ids"])
                       for i, (ids, _) in enumerate(online_inputs))
    if not same_batches:
        raise RuntimeError("the online runs did not see the cached runs' batches")
    visual_diff = max(float((visual - in_memory[i % batches_per_round]["visual"]).abs().max())
                      for i, (_, visual) in enumerate(online_inputs))
    vit_timed = [s for i, s in enumerate(vit_seconds) if i % batches_per_round >= args.warmup]
    vit_quiet = [s for s, quiet in zip(vit_timed, timings["online"].quiet()) if quiet] or vit_timed

    lm_only, cached, online = runs = [timings[name].summary() for name in modes]
    online["vit_ms_per_step"] = 1000 * statistics.mean(vit_quiet)
    # the same batch at the same place in every mode's runs: compare step by step where both were quiet
    both_quiet = [q and r for q, r in zip(cached["step_quiet"], lm_only["step_quiet"])]
    clean = all(run["quiet_steps"] >= MIN_QUIET_STEPS for run in runs)
    basis = "ms_per_step" if clean else "all_steps_ms_per_step"
    paired = [c / l for c, l, q in zip(cached["step_seconds"], lm_only["step_seconds"], both_quiet) if q or not clean]
    return {
        "config": {"vit": "toy ViT (6 blocks, width 32, 32 px)" if args.small else "vit_base_patch16_224 (random init)",
                   "lm": ("toy OPT (12 layers, width 64)" if args.small else
                          "OPT sized like opt-125m (12 layers, width 768, vocab 50272; random init)"),
                   "lm_parameters": sum(p.numel() for p in model.lm.parameters()),
                   "trainable_parameters": sum(p.numel() for p in trainer.trainable),
                   "variant": model.config.variant, "prompt_length": model.config.prompt_length,
                   "batch_size": args.batch_size, "num_workers": args.num_workers, "samples": args.samples,
                   "examples": len(cached_set), "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
                   "mean_text_tokens": statistics.mean(b["input_ids"].shape[1] for b in in_memory[args.warmup :]),
                   "cached_cls": "computed once by the same ViT from the same images (vit-cls expert), float16",
                   "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "runs": runs,
        "ratios_from": "quiet steps" if clean else f"all steps: fewer than {MIN_QUIET_STEPS} quiet steps in some mode",
        "online_over_cached": online[basis] / cached[basis],
        "data_path_overhead": cached[basis] / lm_only[basis] - 1,
        "data_path_overhead_paired_median": statistics.median(paired) - 1 if paired else None,
        "goal_overhead": GOAL,
        "online_matches_cache": {"same_batches": same_batches, "max_abs_visual_diff": visual_diff},
    }


def print_report(result: dict[str, Any]) -> None:
    c = result["config"]
    print(f"\neP-ALM ({c['variant']}, prompt {c['prompt_length']}) train step, batch {c['batch_size']}, "
          f"{c['num_workers']} DataLoader workers, {c['torch_threads']} torch threads, {c['cpus']} CPUs, {c['device']}")
    print(f"  ViT: {c['vit']}\n  LM:  {c['lm']}, {c['trainable_parameters']:,} trainable parameters")
    print(f"  {c['rounds']} rounds x {c['steps']} timed steps per mode ({c['warmup']} warm-up each), modes interleaved; "
          f"{c['mean_text_tokens']:.1f} text tokens per row on average")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print(f"\n{'':<9}{'quiet steps':>12}{'ms/step':>9}{'median':>9}{'min':>9}{'in next()':>10}"
          f"{'all steps':>11}{'our cores':>10}{'others':>8}")
    for row in result["runs"]:
        print(f"{row['name']:<9}{row['quiet_steps']:>7} of {row['steps']:<2}{ms(row['ms_per_step']):>9}"
              f"{ms(row['median_ms']):>9}{ms(row['min_ms']):>9}{ms(row['data_ms']):>10}"
              f"{ms(row['all_steps_ms_per_step']):>11}{row['our_cores']:>10.2f}{row['other_cores']:>8.2f}")
    online = result["runs"][2]
    print(f"(ms: over quiet steps, when the rest of the machine used < {QUIET_CORES} cores; "
          f"online: the ViT forward took {online['vit_ms_per_step']:.1f} ms of each step)")
    print(f"\nratios from {result['ratios_from']}")
    print(f"online / cached              = {result['online_over_cached']:.2f}x")
    paired = result["data_path_overhead_paired_median"]
    print(f"cached / LM only - 1          = {100 * result['data_path_overhead']:+.1f}%  (median of step-by-step ratios: "
          f"{'-' if paired is None else f'{100 * paired:+.1f}%'}; goal <= {100 * result['goal_overhead']:.0f}%)")
    check = result["online_matches_cache"]
    print(f"online [CLS] vs cached: same batches, max |diff| {check['max_abs_visual_diff']:.2e} (cache is float16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="toy ViT and decoder instead of ViT-B/16 + OPT-125m size")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds of the three modes, interleaved so that a slow spell slows them alike (default: 6)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed run (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--num-workers", type=int, default=TrainConfig.num_workers,
                        help=f"DataLoader workers (default: {TrainConfig.num_workers}, the trainer's)")
    parser.add_argument("--samples", type=int, default=64, help="cached images, 5 questions each (default: 64)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/train_step.json"), help="JSON results")
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.batch_size, args.samples) < 1 or min(args.warmup, args.num_workers) < 0:
        parser.error("--rounds, --steps, --batch-size and --samples must be >= 1; --warmup and --num-workers >= 0")

    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as scratch:
        result = run(args, Path(scratch))
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
