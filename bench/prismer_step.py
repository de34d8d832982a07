"""Prismer's training step with 0, 3 and 6 experts: time and memory, side by side in one process.

Three models (the trainer's own `Prismer`) over the same frozen ViT and RoBERTa weights differ
only in the labels they read: none (Prismer's RGB-only baseline), 3 continuous maps (depth,
normal, edge) and all 6 (+ seg-coco, objdet, ocrdet: 64-d id maps). Each step is what
`trainer fit` does per batch: forward over a batch of images with five questions each (the vision
side once per image), label-smoothed loss, backward, gradient clipping, an AdamW step over the
trainable parameters only. The batch is built once, in memory, so the step alone is timed (the
cache's data path is benchmarked in train_step.py).

The models take turns in rounds (A B C, C B A, ...) so a slow spell of the machine falls on all of
them; each reports its median step and the ratio to the baseline's.

Memory, per model:
- activations: bytes autograd saves for backward in one step (counted with saved_tensors_hooks,
  the same on every device) - the part that grows with the batch and with the experts;
- trainable parameters + their AdamW state (2 more copies), frozen parameters;
- on CUDA also the peak allocated in a step (torch.cuda.max_memory_allocated).

    python bench/prismer_step.py            # CLIP ViT-B/16 + RoBERTa-base shapes (random init), batch 4
    python bench/prismer_step.py --small    # tiny ViT (64 px, width 64) + tiny RoBERTa: seconds
    python bench/prismer_step.py --batch-size 16 --rounds 5
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from transformers import RobertaConfig, RobertaForCausalLM

from trainer.loop import autocast, resolve_device
from trainer.methods.prismer import NUM_IDS, ExpertInput, Prismer, PrismerConfig

EXPERT_SETS = {
    0: [],
    3: [ExpertInput("depth", 1), ExpertInput("normal", 3), ExpertInput("edge", 1)],
    6: [ExpertInput("depth", 1), ExpertInput("normal", 3), ExpertInput("edge", 1), ExpertInput("seg-coco", ids=True),
        ExpertInput("objdet", ids=True, instances=True), ExpertInput("ocrdet", ids=True)],
}
QUESTIONS_PER_IMAGE, TEXT_LENGTH = 5, 16


def build(num_experts: int, small: bool, seed: int = 0) -> Prismer:
    torch.manual_seed(seed)
    if small:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=64,
                                depth=6, num_heads=4, num_classes=0)
        lm_config = RobertaConfig(vocab_size=100, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=66)
    else:
        vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0)
        lm_config = RobertaConfig()  # roberta-base's shape
    lm_config.is_decoder = lm_config.add_cross_attention = True
    lm = RobertaForCausalLM(lm_config)
    config = PrismerConfig(vision="bench", lm="bench", experts=EXPERT_SETS[num_experts],
                           **({"num_latents": 32, "resampler_heads": 4} if small else {}))
    return Prismer(config, vit=vit, lm=lm)


def make_batch(size: int, vocab_size: int, batch_size: int, device: torch.device) -> dict:
    """Random images, all six labels at the ViT's input size, and five texts per image."""
    generator = torch.Generator().manual_seed(0)
    labels = {}
    for expert in EXPERT_SETS[6]:
        if expert.ids:
            ids = torch.randint(0, 40, (batch_size, size, size), generator=generator).to(torch.uint8)
            labels[expert.name] = (ids.to(device), torch.randn(batch_size, NUM_IDS, 64, generator=generator).to(device))
        else:
            labels[expert.name] = (torch.rand(batch_size, expert.channels, size, size, generator=generator) * 2 - 1).to(device)
    rows = batch_size * QUESTIONS_PER_IMAGE
    input_ids = torch.randint(3, vocab_size, (rows, TEXT_LENGTH), generator=generator)
    labels_ids = input_ids.clone()
    labels_ids[:, : TEXT_LENGTH // 2] = -100
    return {"rgb": torch.randn(batch_size, 3, size, size, generator=generator).to(device), "expert_labels": labels,
            "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels_ids.to(device),
            "image_index": torch.arange(batch_size).repeat_interleave(QUESTIONS_PER_IMAGE).to(device)}


class Runner:
    def __init__(self, model: Prismer, batch: dict, device: torch.device):
        self.model = model.to(device).train()
        self.device = device
        names = {expert.name for expert in model.config.experts}
        self.batch = {**batch, "expert_labels": {k: v for k, v in batch["expert_labels"].items() if k in names}}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        self.times: list[float] = []
        self.saved_bytes = 0
        self.peak_bytes = 0

    def step(self, count_saved: bool = False) -> None:
        batch = self.batch
        saved = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor.untyped_storage().nbytes())
            return tensor

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else nullcontext()
        with hooks, autocast(self.device):
            loss = self.model(batch["rgb"], batch["expert_labels"], batch["input_ids"], batch["attention_mask"],
                              labels=batch["labels"], image_index=batch["image_index"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
        if count_saved:
            self.saved_bytes = sum(saved)
        else:
            self.times.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny ViT and RoBERTa instead of ViT-B/16 + RoBERTa-base")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 4, --small 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per model (default 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch_size = args.batch_size or (32 if args.small else 4)
    runners, batch = {}, None
    for num_experts in EXPERT_SETS:
        model = build(num_experts, args.small)
        if batch is None:
            batch = make_batch(model.vision.image_size, model.lm.config.vocab_size, batch_size, device)
        runners[num_experts] = Runner(model, batch, device)
        runners[num_experts].step(count_saved=True)  # warm-up, and the activation count
    order = list(runners)
    for round_index in range(args.rounds):
        for num_experts in order if round_index % 2 == 0 else reversed(order):
            runners[num_experts].step()
    baseline = statistics.median(runners[0].times)
    result = {"device": str(device), "small": args.small, "batch_images": batch_size,
              "texts_per_image": QUESTIONS_PER_IMAGE, "threads": torch.get_num_threads(), "models": {}}
    print(f"Prismer step on {device} ({'tiny' if args.small else 'ViT-B/16 + RoBERTa-base'} shapes), "
          f"{batch_size} images x {QUESTIONS_PER_IMAGE} questions, {args.rounds} rounds")
    print(f"{'experts':>8} {'median s':>9} {'x 0 experts':>12} {'activations MB':>15} {'trainable M':>12} "
          f"{'+AdamW MB':>10} {'frozen M':>9} {'peak MB':>8}")
    for num_experts, runner in runners.items():
        trainable = sum(p.numel() for p in runner.trainable)
        frozen = sum(p.numel() for p in runner.model.parameters()) - trainable
        median = statistics.median(runner.times)
        row = {"median_step_s": median, "ratio_to_no_experts": median / baseline,
               "activation_bytes": runner.saved_bytes, "trainable_parameters": trainable,
               "trainable_with_adamw_bytes": 3 * 4 * trainable, "frozen_parameters": frozen,
               "cuda_peak_bytes": runner.peak_bytes or None, "step_times_s": runner.times}
        result["models"][num_experts] = row
        print(f"{num_experts:>8} {median:>9.3f} {median / baseline:>12.2f} {runner.saved_bytes / 2**20:>15.1f} "
              f"{trainable / 1e6:>12.2f} {3 * 4 * trainable / 2**20:>10.1f} {frozen / 1e6:>9.2f} "
              f"{(runner.peak_bytes / 2**20 if runner.peak_bytes else float('nan')):>8.1f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"prismer_step{'_small' if args.small else ''}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
