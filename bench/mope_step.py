"""MoPE training step: the complementary embedding ψ read from the cache vs computed online.

Side by side in one process, on one MoPE model (the trainer's `MoPE`: a frozen main encoder with
static, dynamic and mapped prompts in every layer, router, importance loss, linear head), one
AdamW optimizer and the same batches:

- cached: ψ is a tensor, as `trainer fit` reads it from the cache (`text-cls` / `image-pooled`);
          the step is MoPE's forward, backward and AdamW step.
- online: the same step, after running the frozen complementary encoder (no grad) on the batch's
          text or image to get ψ: what a trainer without the cache pays at every step, every epoch.

Directions (`--main`): `image` prompts a Swin-B with a BERT-base [CLS] (MoPE's main setting,
Food-101 / SNLI-VE), `text` prompts a BERT-base with a Swin-B's pooled embedding. Models are built
from their configs with random weights (no hub; weights do not change the time). Modes alternate
step by step, so a slow spell of a shared machine falls on both; medians are reported.

    python bench/mope_step.py                 # Swin-B + BERT-base, batch 8, 128 tokens, image main
    python bench/mope_step.py --main text
    python bench/mope_step.py --small         # toy models: a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
from transformers import BertConfig, BertModel

from trainer.methods.mope import MoPE, MoPEConfig, prompted_encoder


def build(main: str, small: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(frozen image encoder, frozen text encoder) at full or toy size."""
    if small:
        image = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                                  window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))
        text = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    else:
        image = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
        text = BertModel(BertConfig())  # bert-base-uncased's shape
    return image.eval().requires_grad_(False), text.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", choices=("image", "text"), default="image", help="the prompted modality")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="text length (text-cls's default max_length)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode, after one warm-up each")
    args = parser.parse_args()
    torch.manual_seed(0)
    image_encoder, text_encoder = build(args.main, args.small)
    size = 64 if args.small else 224
    batch = args.batch_size
    pixels = torch.randn(batch, 3, size, size)
    input_ids = torch.randint(1000 if not args.small else 5, text_encoder.config.vocab_size, (batch, args.tokens))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 101, (batch,))

    if args.main == "image":
        main_encoder, main_inputs = image_encoder, {"pixel_values": pixels}
        complementary_dim = text_encoder.config.hidden_size

        def complementary() -> torch.Tensor:
            return text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
    else:
        main_encoder, main_inputs = text_encoder, {"input_ids": input_ids, "attention_mask": attention_mask}
        complementary_dim = image_encoder.num_features

        def complementary() -> torch.Tensor:
            return image_encoder.forward_head(image_encoder.forward_features(pixels), pre_logits=True)

    model = MoPE(MoPEConfig(num_classes=101, complementary_dim=complementary_dim), prompted_encoder(main_encoder)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=1e-3)
    with torch.no_grad():
        cached = complementary()  # what precompute stores (float16 in the cache; the trainer reads it as float32)
    cached = cached.half().float()

    def step(online: bool) -> tuple[float, float]:
        began = time.perf_counter()
        if online:
            with torch.no_grad():
                psi = complementary()
        else:
            psi = cached
        encoded = time.perf_counter()
        loss = model(main_inputs, psi, labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - began, encoded - began

    step(False), step(True)  # warm-up
    times: dict[str, list[float]] = {"cached": [], "online": [], "encoder": []}
    for index in range(args.steps):
        for online in ((False, True) if index % 2 == 0 else (True, False)):
            total, encoder = step(online)
            times["online" if online else "cached"].append(total)
            if online:
                times["encoder"].append(encoder)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in model.encoder.parameters())
    cached_ms, online_ms = (1000 * statistics.median(times[k]) for k in ("cached", "online"))
    result = {
        "main": args.main, "models": "toy" if args.small else "Swin-B + BERT-base", "batch_size": batch,
        "tokens": args.tokens, "threads": torch.get_num_threads(), "trainable": trainable,
        "trainable_share_of_backbone": round(trainable / backbone, 4),
        "cached_ms_per_step": round(cached_ms, 1), "online_ms_per_step": round(online_ms, 1),
        "online_encoder_ms": round(1000 * statistics.median(times["encoder"]), 1),
        "online_step_after_encoder_ms": round(1000 * statistics.median(
            [total - encoder for total, encoder in zip(times["online"], times["encoder"])]), 1),
        "online_over_cached": round(online_ms / cached_ms, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
