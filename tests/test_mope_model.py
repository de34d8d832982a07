"""MoPE's model: prompted ViT / Swin / BERT, router, importance loss, and the collapse it prevents."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from trainer.methods.mope import (
    MoPE,
    MoPEConfig,
    PromptedSwin,
    PromptedText,
    PromptedViT,
    importance_loss,
    merge_prompts,
    prompted_encoder,
    routing_statistics,
)


def tiny_vit(image_size: int = 16) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=0).eval()


def tiny_swin() -> torch.nn.Module:
    # 64 px, patch 4, window 4: 16x16 tokens (16 windows) then 8x8 (4 windows); odd blocks are shifted
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4, embed_dim=32,
                             depths=(2, 2), num_heads=(2, 4), num_classes=0).eval()


def tiny_bert() -> torch.nn.Module:
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()


def no_prompts(encoder):
    widths = [layer.width for layer in encoder.prompted_layers()]
    return lambda index, batch_size: torch.zeros(batch_size, 0, widths[index])


@torch.no_grad()
def test_without_prompts_each_encoder_is_exactly_the_frozen_model():
    torch.manual_seed(0)
    vit, swin, bert = tiny_vit(), tiny_swin(), tiny_bert()
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(PromptedViT(vit)(pixels, prompts=no_prompts(PromptedViT(vit))), vit(pixels))
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.allclose(PromptedSwin(swin)(pixels, prompts=no_prompts(PromptedSwin(swin))), swin(pixels), atol=1e-6)
    input_ids = torch.randint(0, 50, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    expected = bert(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
    text = PromptedText(bert)
    assert torch.allclose(text(input_ids, attention_mask, prompts=no_prompts(text)), expected, atol=1e-6)


def test_swin_prompt_schedule_and_every_window_reads_the_prompts():
    torch.manual_seed(0)
    encoder = PromptedSwin(tiny_swin())
    # fresh prompts in both blocks of stage 1, and only in the second block of stage 2
    assert [(layer.width, layer.stage) for layer in encoder.prompted_layers()] == [(32, 0), (32, 0), (64, 1)]
    block = encoder.swin.layers[0].blocks[0]
    pixels = torch.randn(1, 3, 64, 64)
    hidden = encoder.swin.patch_embed(pixels)
    from trainer.methods.mope import prompted_swin_block

    with torch.no_grad():
        first, _ = prompted_swin_block(block, hidden, torch.randn(1, 2, 32))
        second, _ = prompted_swin_block(block, hidden, torch.randn(1, 2, 32))
    changed = (first - second).abs().amax(dim=-1)[0]  # [16, 16]
    windows = changed.reshape(4, 4, 4, 4).amax(dim=(1, 3))  # per 4x4 window
    assert (windows > 1e-4).all(), "a prompt must reach every window"


def reference_window_attention(block, x, tokens):
    """Window by window, written out: [window tokens; prompts] with the relative-position bias and the
    shift mask on the window block only, then the prompts' outputs averaged over the windows."""
    from timm.models.swin_transformer import window_partition, window_reverse

    batch_size, height, width, channels = x.shape
    shift = block.shift_size
    shifted = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else x
    windows = window_partition(shifted, block.window_size).view(batch_size, -1, block.window_area, channels)
    attention, area, heads, num_prompts = block.attn, block.window_area, block.attn.num_heads, tokens.shape[1]
    relative = attention._get_rel_pos_bias()[0]  # [heads, N, N]
    outputs, prompt_outputs = torch.zeros_like(windows), torch.zeros_like(tokens)
    for b in range(batch_size):
        for w in range(windows.shape[1]):
            sequence = torch.cat([windows[b, w], tokens[b]])
            q, k, v = attention.qkv(sequence).view(-1, 3, heads, channels // heads).permute(1, 2, 0, 3)
            bias = torch.zeros(heads, area + num_prompts, area + num_prompts)
            bias[:, :area, :area] = relative + (block.attn_mask[w] if block.attn_mask is not None else 0)
            weights = ((q @ k.transpose(-1, -2)) * attention.scale + bias).softmax(dim=-1)
            out = attention.proj((weights @ v).transpose(0, 1).reshape(-1, channels))
            outputs[b, w] = out[:area]
            prompt_outputs[b] += out[area:] / windows.shape[1]
    merged = window_reverse(outputs.view(-1, *block.window_size, channels), block.window_size, height, width)
    return (torch.roll(merged, shifts=shift, dims=(1, 2)) if any(shift) else merged), prompt_outputs


@pytest.mark.parametrize("block_index", [0, 1])  # plain and shifted windows
def test_swin_prompted_attention_matches_the_window_by_window_reference(block_index):
    from trainer.methods.mope import prompted_window_attention

    torch.manual_seed(0)
    block = tiny_swin().layers[0].blocks[block_index]
    x, tokens = torch.randn(2, 16, 16, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        expected, expected_tokens = reference_window_attention(block, x, tokens)
        actual, actual_tokens = prompted_window_attention(block, x, tokens)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.allclose(actual_tokens, expected_tokens, atol=1e-5)


def test_prompts_cross_patch_merging_as_a_uniform_two_by_two_patch():
    torch.manual_seed(0)
    merging = tiny_swin().layers[1].downsample
    prompt = torch.randn(1, 1, 32)
    patch = prompt.view(1, 1, 1, 32).expand(1, 2, 2, 32)
    with torch.no_grad():
        assert torch.allclose(merge_prompts(merging, prompt), merging(patch).view(1, 1, 64), atol=1e-6)


def test_importance_loss_is_the_squared_cv_and_off_below_the_threshold():
    balanced = torch.full((8, 4), 0.25)
    assert importance_loss(balanced, threshold=0.05).item() == 0.0
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    assert importance_loss(collapsed, threshold=0.05).item() == pytest.approx(3.0)  # importance [8,0,0,0]: cv^2 = 3
    slightly_off = torch.tensor([[0.26, 0.24, 0.25, 0.25]]).repeat(8, 1)  # cv 0.028
    assert importance_loss(slightly_off, threshold=0.05).item() == 0.0
    assert importance_loss(slightly_off, threshold=0.0).item() > 0.0
    # the paper thresholds the cv itself (0.14 > 0.05), not its square (0.02, which is below)
    uneven = torch.tensor([[0.3, 0.2, 0.25, 0.25]]).repeat(8, 1)
    assert importance_loss(uneven, threshold=0.05).item() == pytest.approx(0.02)


def test_router_noise_only_while_training_and_top1_keeps_one_expert():
    torch.manual_seed(0)
    model = MoPE(MoPEConfig(num_classes=3, complementary_dim=8, prompts=("dynamic",), num_experts=4, routing="top1"),
                 PromptedViT(tiny_vit()))
    pixels, complementary = torch.randn(4, 3, 16, 16), torch.randn(4, 8)
    model.eval()
    with torch.no_grad():
        first = model({"pixel_values": pixels}, complementary)
        again = model({"pixel_values": pixels}, complementary)
        mixing, clean = model.prompts.route(0, complementary)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.routing[0], again.routing[0])
    assert ((mixing > 0).sum(dim=-1) == 1).all()  # top-1 mixes one expert...
    assert torch.equal(first.routing[0], clean) and ((clean > 0).sum(dim=-1) == 4).all()  # ...importance reads all
    model.train()
    assert not model.encoder.training  # the frozen encoder never drops out
    with torch.no_grad():
        noisy = [model({"pixel_values": pixels}, complementary) for _ in range(3)]
    assert any(not torch.equal(noisy[0].logits, other.logits) for other in noisy[1:])  # the noise moves the prompt
    # Eq. 5: the importance loss sums the routing scores without the noise
    assert all(torch.equal(noisy[0].routing[0], other.routing[0]) for other in noisy[1:])
    assert torch.allclose(noisy[0].routing[0], clean)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="complementary"):
        MoPEConfig(num_classes=3, prompts=("static", "dynamic"))
    with pytest.raises(ValueError, match="prompts"):
        MoPEConfig(num_classes=3, prompts=("static", "deep"))
    with pytest.raises(ValueError, match="not a timm"):
        prompted_encoder(torch.nn.Linear(2, 2))


def train_routing(importance_weight: float, seed: int, steps: int = 100) -> float:
    """Mean per-layer coefficient of variation of expert importance on held-out data after training
    dynamic prompts only, on a problem whose class is in ψ (4 clusters), with 8 experts."""
    torch.manual_seed(seed)
    config = MoPEConfig(num_classes=4, complementary_dim=16, prompts=("dynamic",), prompt_length=2, num_experts=8,
                        importance_weight=importance_weight)
    model = MoPE(config, PromptedViT(tiny_vit())).train()
    centres = torch.randn(4, 16) * 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def batch(size: int):
        labels = torch.randint(0, 4, (size,))
        return torch.randn(size, 3, 16, 16), centres[labels] + torch.randn(size, 16), labels

    for _ in range(steps):
        pixels, complementary, labels = batch(32)
        loss = model({"pixel_values": pixels}, complementary, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pixels, complementary, _ = batch(256)
        routing = model({"pixel_values": pixels}, complementary).routing
    return routing_statistics(routing)["importance_cv"]


@pytest.mark.parametrize("seed", [0, 1])
def test_without_the_importance_loss_routing_collapses_and_with_it_stays_balanced(seed):
    collapsed = train_routing(importance_weight=0.0, seed=seed)
    balanced = train_routing(importance_weight=1.0, seed=seed)
    # 8 experts: all mass on one gives cv 2.65, on four equally 1.0, uniform 0
    assert collapsed > 0.8, collapsed
    assert balanced < 0.5, balanced


def test_trainable_share_matches_the_paper_for_swin_b_and_bert_base():
    """Built from config on the meta device (no weights, no memory): prompts + routers + mapper +
    head are 1-3% of the frozen backbone, as in the paper."""
    with torch.device("meta"):
        swin = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
        bert = BertModel(BertConfig())  # bert-base-uncased's shape
        image_main = MoPE(MoPEConfig(num_classes=101, complementary_dim=768), PromptedSwin(swin))
        text_main = MoPE(MoPEConfig(num_classes=101, complementary_dim=1024), PromptedText(bert))
    for model in (image_main, text_main):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        backbone = sum(p.numel() for p in model.encoder.parameters())
        assert 0.01 < trainable / backbone < 0.03, (type(model.encoder).__name__, trainable, backbone)
        assert not any(p.requires_grad for p in model.encoder.parameters())
