"""Gradient checkpointing and bf16 autocast on the CPU: the same training, less memory or precision."""

from __future__ import annotations

import pytest
import torch

from cases import BACKBONES, model_config, toy_batch
from mmpeft import build_model
from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from test_trainer import one_thread  # noqa: F401  (fixture)

METHODS = [
    {"name": "lora", "r": 2},
    {"name": "uniadapter", "r": 4},
    {"name": "mwa", "r": 4, "enhancer_dim": 8},
    {"name": "pmf"},
    {"name": "wander", "layers": [-2, -1], "k": 2, "r": 4, "rank": 2},
    {"name": "prompt", "layers": [-2, -1]},
]


def loss_and_grads(method: dict, checkpointing: bool):
    torch.manual_seed(0)
    model = build_model(model_config("pair_equal", [method]))
    with torch.no_grad():  # zero-initialised parts would give zero gradients below them
        for p in model.peft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    model.backbone.gradient_checkpointing = checkpointing
    torch.manual_seed(1)  # the same dropout draws (checkpointing replays the RNG in recompute)
    loss = model(toy_batch(BACKBONES["pair_equal"]))["logits"].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method):
    loss, grads = loss_and_grads(method, False)
    loss_ckpt, grads_ckpt = loss_and_grads(method, True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_keeps_fewer_activations():
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = build_model(model_config("pair_equal", [{"name": "lora", "r": 2}])).train()
        model.backbone.gradient_checkpointing = checkpointing
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            model(toy_batch(BACKBONES["pair_equal"]))["logits"].sum()
        return total[0]

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_a_run_with_checkpointing_and_one_with_bf16_on_the_cpu():
    base = [
        "method=lora",
        "train.epochs=2",
        "train.tensorboard=false",
        "train.progress=false",
        "train.cache_dir=''",
    ]
    plain = Trainer(load_run_config("toy", base)).fit()
    ckpt = Trainer(load_run_config("toy", [*base, "train.gradient_checkpointing=true"])).fit()
    for a, b in zip(plain["history"], ckpt["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    bf16 = Trainer(load_run_config("toy", [*base, "train.mixed_precision=bf16"])).fit()
    assert bf16["history"][-1]["train_loss"] == pytest.approx(plain["history"][-1]["train_loss"], rel=0.05)
    assert bf16["history"][-1]["train_loss"] != plain["history"][-1]["train_loss"]  # autocast really ran


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_compiled_forward_gives_the_same_loss_and_gradients(method):
    """torch.compile traces every method (aot_eager: the traced graph, no code generation, so equal
    to eager bit for bit up to op reordering); inductor is the same graph with generated kernels."""
    loss, grads = loss_and_grads(method, False)
    torch.manual_seed(0)
    model = build_model(model_config("pair_equal", [method]))
    with torch.no_grad():
        for p in model.peft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(1)
    compiled_loss = compiled(toy_batch(BACKBONES["pair_equal"]))["logits"].square().mean()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-7, msg=n)


def test_a_compiled_run_trains_like_an_eager_one_without_recompiling_per_batch():
    from torch._dynamo.utils import counters

    base = ["method=lora", "train.epochs=2", "train.tensorboard=false", "train.progress=false"]
    plain = Trainer(load_run_config("toy", base)).fit()
    torch._dynamo.reset()
    counters.clear()
    compiled = Trainer(
        load_run_config("toy", [*base, "train.compile=true", "train.compile_backend=aot_eager"])
    ).fit()
    for a, b in zip(plain["history"], compiled["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert compiled["test"] == pytest.approx(plain["test"])
    # 12 batches: a graph for full batches (and one for the short last one), not one per batch
    assert 1 <= counters["stats"]["unique_graphs"] <= 4
    with pytest.raises(Exception, match="compile_backend 'nope' is not one of"):
        Trainer(load_run_config("toy", [*base, "train.compile=true", "train.compile_backend=nope"])).fit()
