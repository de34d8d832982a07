"""Prismer's model on tiny real timm / transformers models: shapes, identities, inference."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import RobertaForCausalLM

from trainer.methods.prismer import (
    NUM_IDS,
    ExpertInput,
    ExpertsResampler,
    Prismer,
    PrismerConfig,
    embed_ids,
)

IMAGE, WIDTH = 32, 32
SIX_EXPERTS = [ExpertInput("depth", 1), ExpertInput("normal", 3), ExpertInput("edge", 1),
               ExpertInput("seg-coco", ids=True), ExpertInput("objdet", ids=True, instances=True),
               ExpertInput("ocrdet", ids=True)]


def tiny_vit(seed: int = 0) -> timm.models.VisionTransformer:
    torch.manual_seed(seed)
    return timm.models.VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=2, num_heads=2, num_classes=0)


def tiny_prismer(roberta_dir, experts=SIX_EXPERTS, **changes) -> Prismer:
    config = PrismerConfig(vision="tiny", lm=str(roberta_dir), experts=list(experts), num_latents=8, resampler_heads=4,
                           num_instance_embeddings=16, **changes)
    lm = RobertaForCausalLM.from_pretrained(roberta_dir, is_decoder=True, add_cross_attention=True)
    return Prismer(config, vit=tiny_vit(), lm=lm)


def expert_inputs(experts, batch_size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = {}
    for expert in experts:
        if expert.ids:
            ids = torch.randint(0, 6, (batch_size, IMAGE, IMAGE), generator=generator).to(torch.uint8)
            ids[:, :4] = NUM_IDS - 1
            labels[expert.name] = (ids, torch.randn(batch_size, NUM_IDS, 64, generator=generator))
        else:
            labels[expert.name] = torch.rand(batch_size, expert.channels, IMAGE, IMAGE, generator=generator) * 2 - 1
    return labels


def test_resampler_output_shape_does_not_depend_on_the_number_of_experts():
    resampler = ExpertsResampler(width=WIDTH, num_latents=8, layers=4, heads=4)
    for num_experts in (1, 3, 6):
        tokens = torch.randn(2, num_experts * 16, WIDTH)
        assert resampler(tokens).shape == (2, 8, WIDTH)


def open_gates(model: Prismer, value: float = 0.5) -> Prismer:
    """Read-outs as training would leave them (non-zero), so the latents (and so the expert labels) reach the output."""
    with torch.no_grad():
        for readout in model.vision.readouts:
            readout.weight.copy_(value * torch.eye(readout.weight.shape[0]))
    return model


def test_the_decoder_reads_the_rgb_tokens_then_the_latents_whatever_the_experts(tiny_roberta_dir):
    """The latents travel through the ViT beside the [CLS] + patch tokens; the decoder reads both
    (the latents through its own zero-started reader), or the RGB tokens only when told not to."""
    rgb = torch.randn(2, 3, IMAGE, IMAGE)
    grid_tokens = (IMAGE // 8) ** 2
    for experts in ([], SIX_EXPERTS[:1], SIX_EXPERTS[:3], SIX_EXPERTS):
        model = open_gates(tiny_prismer(tiny_roberta_dir, experts)).eval()
        tokens, latents = model.vision(rgb, expert_inputs(experts, 2))
        assert tokens.shape == (2, 1 + grid_tokens, WIDTH) and latents.shape == (2, 8, WIDTH)
        assert model.encode_image(rgb, expert_inputs(experts, 2)).shape == (2, 1 + grid_tokens + 8, WIDTH)
        assert model.vision.resampler is not None and len(model.vision.readouts) == 2
    rgb_only = tiny_prismer(tiny_roberta_dir, SIX_EXPERTS, decoder_reads_latents=False)
    assert rgb_only.encode_image(rgb, expert_inputs(SIX_EXPERTS, 2)).shape == (2, 1 + grid_tokens, WIDTH)
    assert not any(".latent_reader." in name for name, _ in rgb_only.named_parameters())
    bare = tiny_prismer(tiny_roberta_dir, [], baseline_latents=False)
    assert bare.vision.resampler is None and bare.vision.readouts is None
    assert bare.vision(rgb, {})[1] is None and bare.encode_image(rgb, {}).shape == (2, 1 + grid_tokens, WIDTH)


def test_through_the_decoders_reader_alone_the_answer_depends_on_the_expert_labels(tiny_roberta_dir):
    """With the ViT's read-outs shut (the RGB tokens are the frozen ViT's), an open decoder reader
    still carries the labels to the logits: the release's route, the decoder reading the latents."""
    model = tiny_prismer(tiny_roberta_dir).eval()
    with torch.no_grad():
        for layer in model.lm.roberta.encoder.layer:
            layer.crossattention.latent_reader.readout.weight.copy_(torch.eye(WIDTH))
        rgb, ids = torch.randn(2, 3, IMAGE, IMAGE), torch.randint(4, 20, (2, 6))
        first = model(rgb, expert_inputs(SIX_EXPERTS, 2, seed=0), ids, torch.ones_like(ids)).logits
        second = model(rgb, expert_inputs(SIX_EXPERTS, 2, seed=1), ids, torch.ones_like(ids)).logits
        assert torch.allclose(model.vision(rgb, expert_inputs(SIX_EXPERTS, 2))[0], tiny_vit().eval().forward_features(rgb),
                              atol=1e-6)
    assert not torch.allclose(first, second, atol=1e-4)


def shared_weights_from(source: Prismer, target: Prismer) -> None:
    """Copy every parameter and buffer the two models share (all but the expert stems)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(name.startswith(("vision.stems.", "vision.instance_embedding")) for name in missing)


def test_with_and_without_experts_start_as_the_same_pretrained_model(tiny_roberta_dir):
    """The fair comparison: given the same shared weights, both arms give the same logits at the
    start (the zero read-outs keep the latents out of the RGB tokens), and their RGB tokens are
    exactly the frozen ViT's; one optimiser step moves the read-outs off zero and the output moves."""
    baseline = tiny_prismer(tiny_roberta_dir, experts=[]).train()
    with_experts = tiny_prismer(tiny_roberta_dir).train()
    shared_weights_from(baseline, with_experts)
    rgb, labels = torch.randn(2, 3, IMAGE, IMAGE), expert_inputs(SIX_EXPERTS, 2)
    ids = torch.randint(4, 20, (2, 6))
    with torch.no_grad():
        for mode in ("eval", "train"):  # train mode draws instance embeddings: still no effect through a zero read-out
            getattr(baseline, mode)(), getattr(with_experts, mode)()
            reference = baseline(rgb, {}, ids, torch.ones_like(ids)).logits
            assert torch.equal(with_experts(rgb, labels, ids, torch.ones_like(ids)).logits, reference)
        assert torch.allclose(with_experts.vision(rgb, labels)[0], tiny_vit().eval().forward_features(rgb), atol=1e-6)
        # the latents do differ between the arms: only the zero read-out keeps them out
        assert not torch.allclose(with_experts.vision.latents(2, labels, rgb.new_zeros(2, 1, WIDTH)),
                                  baseline.vision.latents(2, {}, rgb.new_zeros(2, 1, WIDTH)))
    with_experts.train()
    optimizer = torch.optim.AdamW([p for p in with_experts.parameters() if p.requires_grad], lr=1e-2)
    loss = with_experts(rgb, labels, ids, torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert all(readout.weight.grad.abs().max() > 0 for readout in with_experts.vision.readouts)
    readers = [layer.crossattention.latent_reader.readout for layer in with_experts.lm.roberta.encoder.layer]
    assert all(reader.weight.grad.abs().max() > 0 for reader in readers)
    optimizer.step()
    assert all(readout.weight.abs().max() > 0 for readout in with_experts.vision.readouts)
    with torch.no_grad():
        with_experts.eval(), baseline.eval()
        after = with_experts.vision(rgb, labels)[0]
        before = baseline.vision(rgb, {})[0]
        assert not torch.allclose(after, before, atol=1e-4)
        # and what moved it is the expert input: other labels now give other tokens
        assert not torch.allclose(after, with_experts.vision(rgb, expert_inputs(SIX_EXPERTS, 2, seed=1))[0], atol=1e-6)


def test_trainable_budget_differs_between_the_arms_by_the_expert_stems_only(tiny_roberta_dir):
    def trainable(model: Prismer) -> dict[str, int]:
        return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}

    baseline, with_experts = trainable(tiny_prismer(tiny_roberta_dir, [])), trainable(tiny_prismer(tiny_roberta_dir))
    assert set(baseline) < set(with_experts)
    assert all(name.startswith(("vision.stems.", "vision.instance_embedding")) for name in set(with_experts) - set(baseline))
    assert "vision.readouts.0.weight" in baseline and any(name.startswith("vision.resampler.") for name in baseline)


def test_adaptors_start_as_the_identity(tiny_roberta_dir):
    """Zero-initialised up-projections: before training, the RGB path is exactly the frozen ViT."""
    model = tiny_prismer(tiny_roberta_dir, experts=[]).eval()
    rgb = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.allclose(model.vision(rgb, {})[0], tiny_vit().eval().forward_features(rgb), atol=1e-6)


def test_id_maps_become_each_pixels_vector_and_nothing_is_zero():
    ids = torch.tensor([[[0, 1], [255, 1]]], dtype=torch.uint8)
    vocab = torch.zeros(1, NUM_IDS, 3)
    vocab[0, 0], vocab[0, 1] = torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 5, 6])
    embedded = embed_ids(ids, vocab)
    assert embedded.shape == (1, 3, 2, 2)
    assert embedded[0, :, 0, 0].tolist() == [1, 2, 3] and embedded[0, :, 1, 1].tolist() == [4, 5, 6]
    assert embedded[0, :, 1, 0].tolist() == [0, 0, 0]


def test_instance_embeddings_mark_instances_only_and_are_fixed_in_eval(tiny_roberta_dir):
    model = tiny_prismer(tiny_roberta_dir)
    ids = torch.full((1, IMAGE, IMAGE), NUM_IDS - 1, dtype=torch.uint8)
    ids[0, :16, :16] = 3
    model.eval()
    first, second = (model.vision.instance_features(ids, 4) for _ in range(2))
    assert torch.equal(first, second)
    assert first[0, :, :2, :2].abs().sum() > 0 and first[0, :, 2:, 2:].abs().sum() == 0
    model.train()
    draws = {tuple(model.vision.instance_features(ids, 4)[0, :, 0, 0].tolist()) for _ in range(8)}
    assert len(draws) > 1  # a random row per instance while training


@pytest.mark.parametrize("freeze", ["pretrain", "finetune"])
def test_only_the_policys_parameters_train_and_frozen_weights_do_not_move(tiny_roberta_dir, freeze):
    model = tiny_prismer(tiny_roberta_dir, freeze=freeze).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("vision.vit.") for name in trainable)
    assert any("crossattention.attention" in name for name in trainable)
    assert any("crossattention.adaptor" in name for name in trainable)
    self_attention = "lm.roberta.encoder.layer.0.attention.self.query.weight"
    assert (self_attention in trainable) == (freeze == "finetune")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        ids = torch.randint(4, 20, (2, 6))
        loss = model(torch.randn(2, 3, IMAGE, IMAGE), expert_inputs(SIX_EXPERTS, 2), ids, torch.ones_like(ids),
                     labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert moved and moved <= trainable, f"frozen parameters changed: {sorted(moved - trainable)[:5]}"


def test_batched_generation_with_left_padding_equals_one_row_at_a_time(tiny_roberta_dir):
    model = open_gates(tiny_prismer(tiny_roberta_dir)).eval()
    rgb, labels = torch.randn(2, 3, IMAGE, IMAGE), expert_inputs(SIX_EXPERTS, 2)
    input_ids = torch.tensor([[1, 1, 0, 7, 8], [0, 9, 10, 11, 12]])
    attention_mask = (input_ids != 1).long()
    batched = model.generate(rgb, labels, input_ids, attention_mask, max_new_tokens=5, num_beams=3)
    for row in range(2):
        start = 2 if row == 0 else 0
        single = model.generate(rgb[row : row + 1], {k: tuple(t[row : row + 1] for t in v) if isinstance(v, tuple)
                                                     else v[row : row + 1] for k, v in labels.items()},
                                input_ids[row : row + 1, start:], attention_mask[row : row + 1, start:],
                                max_new_tokens=5, num_beams=3)
        assert batched[row] == single[0]


def test_rank_picks_the_candidate_with_the_best_mean_log_likelihood(tiny_roberta_dir):
    model = open_gates(tiny_prismer(tiny_roberta_dir)).eval()
    rgb, labels = torch.randn(2, 3, IMAGE, IMAGE), expert_inputs(SIX_EXPERTS, 2)
    input_ids = torch.tensor([[1, 0, 7, 8], [0, 9, 10, 11]])
    attention_mask = (input_ids != 1).long()
    answers = torch.tensor([[12, 2, 1], [13, 14, 2], [15, 2, 1], [16, 17, 2]])
    answer_mask = (answers != 1).long()
    chosen = model.rank_answers(rgb, labels, input_ids, attention_mask, answers, answer_mask, num_candidates=4)
    with torch.no_grad():
        for row in range(2):
            prompt = input_ids[row][attention_mask[row].bool()]
            scores = []
            for answer, mask in zip(answers, answer_mask):
                answer = answer[mask.bool()]
                ids = torch.cat([prompt, answer]).unsqueeze(0)
                log_probs = model(rgb[row : row + 1], {k: tuple(t[row : row + 1] for t in v) if isinstance(v, tuple)
                                                        else v[row : row + 1] for k, v in labels.items()},
                                  ids, torch.ones_like(ids)).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
                scores.append(log_probs.gather(-1, answer.unsqueeze(-1)).mean().item())
            assert chosen[row].item() == max(range(len(scores)), key=scores.__getitem__)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="freeze"):
        PrismerConfig(freeze="everything")
    with pytest.raises(ValueError, match="experts must be distinct"):
        PrismerConfig(experts=[ExpertInput("depth", 1), ExpertInput("depth", 1)])
    with pytest.raises(ValueError, match="heads must divide"):
        ExpertsResampler(width=30, num_latents=4, layers=1, heads=4)
