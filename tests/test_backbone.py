"""Lockstep schedule, the no-grad frozen prefix, and failure messages of the backbone."""

from __future__ import annotations

import pytest
import torch

from cases import BACKBONES, model_config, toy_batch
from mmpeft import build_model
from mmpeft.backbone import EMBED_STEP


def record_grad_mode(model):
    """Forward hooks on every block recording (modality, layer) -> grad enabled, output requires grad."""
    seen = {}
    for m, enc in model.backbone.encoders.items():
        for i in range(enc.num_layers):

            def hook(mod, args, out, key=(m, i)):
                seen[key] = (torch.is_grad_enabled(), out.requires_grad)

            enc.block(i).register_forward_hook(hook)
    return seen


def test_encoders_align_from_the_end():
    model = build_model(model_config("triple", []))
    bb = model.backbone
    assert bb.num_steps == 4  # depths 2, 3, 4
    assert [bb.layer_at("text", s) for s in range(4)] == [None, None, 0, 1]
    assert [bb.layer_at("image", s) for s in range(4)] == [None, 0, 1, 2]
    assert bb.step_of("audio", 0) == 0


def test_no_autograd_graph_before_first_trainable_step():
    cfg = model_config("triple", [{"name": "lora", "layers": [-1], "modalities": ["image"]}])
    model = build_model(cfg)
    first = model.backbone.first_trainable_step()
    assert first == model.backbone.step_of("image", 2) == 3
    seen = record_grad_mode(model)
    loss = model(toy_batch(BACKBONES["triple"]))["logits"].sum()
    loss.backward()
    for (m, i), (grad_on, out_requires_grad) in seen.items():
        step = model.backbone.step_of(m, i)
        assert grad_on == (step >= first), (m, i)
        if step < first:
            assert not out_requires_grad, f"{m} block {i} built an autograd graph before step {first}"
    assert seen[("image", 2)] == (True, True)


def test_linear_probe_runs_the_whole_backbone_without_grad():
    model = build_model(model_config("pair", [{"name": "linear"}]))
    assert model.backbone.first_trainable_step() == model.backbone.num_steps
    seen = record_grad_mode(model)
    model(toy_batch(BACKBONES["pair"]))["logits"].sum().backward()
    assert not any(grad_on for grad_on, _ in seen.values())


def test_full_fine_tuning_needs_grad_from_the_embeddings():
    model = build_model(model_config("pair", [{"name": "full", "modalities": ["image"]}]))
    assert model.backbone.first_trainable_step() == EMBED_STEP


def test_disabled_backbone_skips_methods():
    model = build_model(model_config("pair", [{"name": "lora", "targets": ["o"]}]))
    batch = toy_batch(BACKBONES["pair"])
    with torch.no_grad():
        for p in model.peft.parameters():
            p.add_(0.5)
        on = model.backbone(batch)["text"].tokens
        with model.adapters_disabled():
            off = model.backbone(batch)["text"].tokens
            reference = model.backbone.encoders["text"].reference_forward(batch["text"])
    assert not torch.allclose(on, off)
    assert torch.equal(off, reference)


def test_missing_modality_is_named():
    model = build_model(model_config("pair", []))
    batch = toy_batch(BACKBONES["pair"])
    del batch["image"]
    with pytest.raises(ValueError, match="missing modality \\['image'\\]"):
        model(batch)


def test_wrong_feature_width_is_named():
    model = build_model(model_config("pair", []))
    batch = toy_batch(BACKBONES["pair"])
    batch["text"]["values"] = batch["text"]["values"][..., :3]
    with pytest.raises(ValueError, match="expected feature width 8, got 3"):
        model(batch)


def test_out_of_range_layer_is_named():
    with pytest.raises(ValueError, match="layer 5 is out of range for encoder 'text'"):
        build_model(model_config("pair", [{"name": "lora", "layers": [5]}]))


def test_run_block_tail_equals_full_block_rows():
    model = build_model(model_config("pair", []))
    enc = model.backbone.encoders["image"]
    state = enc.embed(toy_batch(BACKBONES["pair"])["image"])
    full = enc.run_block(1, state).tokens
    assert torch.allclose(enc.run_block_tail(1, state, 3), full[:, -3:], atol=1e-6)
