"""MultiWay-Adapter: parameter counts, insertion point, per-modality routing, the shared enhancer, and
the ITC loss MWA trains with (the retrieval task's)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cases import BACKBONES, model_config, toy_batch
from mmpeft import METHODS, ConfigError, build_model, parameter_counts
from mmpeft.methods.mwa import MWAConfig
from mmpeft.tasks.base import build_task


def wide_pair(**mwa) -> dict:
    """Two 12-block width-768 toy towers (tiny FFNs: only the adapters' shapes matter)."""
    enc = {"type": "toy", "config": {"input_dim": 4, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 0.01}}
    return {
        "encoders": {"image": enc, "text": enc},
        "methods": [{"name": "mwa", **mwa}],
        "head": {"num_outputs": 0},
    }


def build(methods: list[dict], backbone: str = "pair", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config(backbone, methods)).eval()


def test_parameter_count_of_the_adapters_on_a_base_sized_pair():
    with torch.device("meta"):  # shapes only, no 100M-parameter init
        model = build_model(wide_pair(r=64, enhancer_layers=[]))
    # per adapter: W_d 768*64 + b_d 64 + W_u 64*768 + b_u 768 = 99,136;
    # 2 modalities x 12 layers x 99,136 = 2,379,264
    assert parameter_counts(model)["mwa"] == {"image": 1_189_632, "text": 1_189_632}
    assert (
        sum(parameter_counts(model)["mwa"].values()) == 2 * 12 * (768 * 64 + 64 + 64 * 768 + 768) == 2_379_264
    )


def test_parameter_count_of_the_shared_enhancer():
    with torch.device("meta"):
        default = build_model(wide_pair(r=64))
        released = build_model(wide_pair(r=64, enhancer_layers=None, enhancer_dim=None, enhancer_subln=False))
    # default: last 2 blocks, hidden 512: fc1 768*512+512, sub-LN 2*512, fc2 512*768+768
    assert parameter_counts(default)["mwa"]["shared"] == 2 * (768 * 512 + 512 + 2 * 512 + 512 * 768 + 768)
    # released code: every block, the encoder's own FFN width (here int(768 * 0.01) = 7), one copy for both
    assert parameter_counts(released)["mwa"]["shared"] == 12 * (768 * 7 + 7 + 7 * 768 + 768)


def test_unequal_widths_get_per_modality_bridges():
    model = build([{"name": "mwa", "r": 4, "enhancer_dim": 8, "enhancer_layers": [-1]}], "triple")
    parts = model.peft["mwa"]
    # the shared space is the widest encoder's (image, 48): it needs no bridge, the others do
    assert "bridges" not in parts["image"]
    assert parts["text"]["bridges"]["-1"].into.weight.shape == (48, 32)
    assert parts["audio"]["bridges"]["-1"].out.weight.shape == (24, 48)
    assert parts["enhancer"]["-1"].fc1.weight.shape == (8, 48)


def test_adapter_is_parallel_to_the_ffn_on_its_input():
    """Block output = x' + FFN(LN x') + s * up(ReLU(down x')) with x' the residual after attention."""
    model = build([{"name": "mwa", "r": 4, "scale": 0.6, "enhancer_layers": []}])
    adapter = model.peft["mwa"]["text"]["adapters"]["1"]
    torch.nn.init.normal_(adapter.up.weight)
    enc = model.backbone.encoders["text"]
    block = enc.model.blocks[1]
    state = enc.embed(toy_batch(BACKBONES["pair"])["text"])
    bias = torch.zeros(state.pad_mask.shape).masked_fill(state.pad_mask, -1e9)[:, None, None, :]
    with torch.no_grad():
        got = model.backbone.run_block("text", 1, state).tokens
        with model.adapters_disabled():  # the block's own modules, hooks off
            x = state.tokens + block.attention(block.ln1(state.tokens), bias)
            ffn = block.fc2(F.gelu(block.fc1(block.ln2(x))))
        want = x + ffn + 0.6 * adapter.up(F.relu(adapter.down(x)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_post_ln_route_reads_the_input_of_fc1():
    torch.manual_seed(0)
    model = build_model(model_config("pair", []))
    enc = model.backbone.encoders["text"]
    enc.pre_norm = False  # route as for BERT: x' is what fc1 receives
    model.attach("mwa", MWAConfig(r=4, enhancer_layers=[], modalities=["text"], layers=[0]))
    adapter = model.peft["mwa"]["text"]["adapters"]["0"]
    torch.nn.init.normal_(adapter.up.weight)
    model.eval()
    state = enc.embed(toy_batch(BACKBONES["pair"])["text"])
    block = enc.model.blocks[0]
    seen = {}
    block.fc1.register_forward_pre_hook(lambda mod, args: seen.setdefault("fc1_in", args[0]))
    with torch.no_grad():
        got = model.backbone.run_block("text", 0, state).tokens
        with model.adapters_disabled():
            plain = model.backbone.run_block("text", 0, state).tokens
    torch.testing.assert_close(got - plain, adapter(seen["fc1_in"]), atol=1e-5, rtol=1e-5)


HF_LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
HF = {  # a post-LN text tower (BERT) and a pre-LN vision tower (CLIP) of one width
    "text": {"type": "hf_bert", "config": {"model_type": "bert", **HF_LAYERS, "vocab_size": 40}},
    "image": {
        "type": "hf_clip_vision",
        "config": {"model_type": "clip_vision_model", **HF_LAYERS, "image_size": 16, "patch_size": 8},
    },
}


def record(enc, where: str) -> dict:
    """Observe block 1's x' (the input of ``where``) and fc2's input and (hooked) output."""
    seen: dict = {}
    found = {**enc.linears(1), **enc.norms(1)}
    seen["handles"] = [
        found[where].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].clone())),
        found["fc2"].register_forward_hook(
            lambda mod, args, out: seen.update(h=args[0].clone(), y=out.clone())
        ),
    ]
    return seen


def test_routes_on_real_hf_blocks():
    """x' is ln_ffn's input on CLIP (pre-LN) and fc1's input on BERT (post-LN); A(x') joins fc2's output."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(
        {"encoders": HF, "methods": [{"name": "mwa", "r": 2, "enhancer_dim": 4}], "head": {"num_outputs": 0}}
    ).eval()
    text, image = model.backbone.encoders["text"], model.backbone.encoders["image"]
    assert not text.pre_norm and image.pre_norm
    inputs = {"text": text.collate([[2, 5, 6, 7, 3], [2, 8, 3]]), "image": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        with model.adapters_disabled():
            frozen = model.backbone(inputs)
        states = model.backbone(inputs)
    for m in ("text", "image"):
        assert torch.equal(states[m].tokens, frozen[m].tokens), m  # identity at init
        perturb(model.peft["mwa"][m]["adapters"]["1"])
    perturb(model.peft["mwa"]["enhancer"])
    for m, enc, where in (("text", text, "fc1"), ("image", image, "ln_ffn")):
        seen = record(enc, where)
        with torch.no_grad():
            model.backbone(inputs)
            for h in seen.pop("handles"):
                h.remove()
            fc2 = enc.linears(1)["fc2"]
            plain = F.linear(seen["h"], fc2.weight, fc2.bias)  # what fc2 alone gave
            want = model.peft["mwa"][m]["adapters"]["1"](seen["x"])
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(seen["y"] - plain, want, atol=1e-5, rtol=1e-4)


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_each_modality_only_uses_its_own_adapters():
    model = build([{"name": "mwa", "r": 4, "enhancer_dim": 8, "enhancer_layers": [-1]}], "triple")
    batch = toy_batch(BACKBONES["triple"])
    perturb(model.peft["mwa"]["enhancer"])  # the shared block is live: nonzero output
    with torch.no_grad():
        before = model.backbone(batch)
        perturb(model.peft["mwa"]["text"]["adapters"])
        after = model.backbone(batch)
    assert not torch.equal(before["text"].tokens, after["text"].tokens)
    for m in ("image", "audio"):
        assert torch.equal(before[m].tokens, after[m].tokens), m


def states_before_step(model, batch, step: int):
    with torch.no_grad():
        return model.backbone.run_steps(model.backbone.embed(batch), 0, step)


def test_shared_enhancer_acts_on_every_modality_only_at_its_layers():
    model = build([{"name": "mwa", "r": 4, "enhancer_dim": 8, "enhancer_layers": [-1]}])
    batch = toy_batch(BACKBONES["pair"])
    last = model.backbone.num_steps - 1
    early, final = states_before_step(model, batch, last), model.backbone(batch)
    perturb(model.peft["mwa"]["enhancer"])
    early2, final2 = states_before_step(model, batch, last), model.backbone(batch)
    for m in ("text", "image"):
        assert torch.equal(early[m].tokens, early2[m].tokens), m  # before the enhancer layer: untouched
        assert not torch.equal(final[m].tokens, final2[m].tokens), m  # after it: both modalities move


def test_enhancer_gradient_comes_from_both_modalities():
    model = build([{"name": "mwa", "r": 4, "enhancer_dim": 8, "enhancer_layers": [-2, -1]}])
    batch = toy_batch(BACKBONES["pair"])
    fc2 = model.peft["mwa"]["enhancer"]["-1"].fc2.weight
    grads = {}
    for m in ("text", "image"):
        model.zero_grad()
        model.backbone(batch)[m].tokens.pow(2).sum().backward()
        grads[m] = fc2.grad.clone()
        assert grads[m].abs().sum() > 0, m
    model.zero_grad()
    states = model.backbone(batch)
    (states["text"].tokens.pow(2).sum() + states["image"].tokens.pow(2).sum()).backward()
    torch.testing.assert_close(fc2.grad, grads["text"] + grads["image"])


def test_identity_at_init_in_train_mode_too():
    model = build([{"name": "mwa", "r": 4, "enhancer_dim": 8, "dropout": 0.5}], "triple").train()
    batch = toy_batch(BACKBONES["triple"])
    with torch.no_grad():
        states = model.backbone(batch)
        with model.adapters_disabled():
            frozen = model.backbone(batch)
    for m in states:
        assert torch.equal(states[m].tokens, frozen[m].tokens), m


def test_capabilities_and_config_errors():
    method = METHODS.get("mwa")
    assert method.identity_at_init and not method.needs_equal_width and not method.may_skip_params
    with pytest.raises(ConfigError, match="r must be"):
        build([{"name": "mwa", "r": 0}])
    with pytest.raises(ConfigError, match="enhancer_dropout"):
        build([{"name": "mwa", "enhancer_dropout": 1.0}])
    with pytest.raises(ValueError, match="twice"):
        build([{"name": "mwa", "modalities": ["image"], "enhancer_layers": [-1, 2]}])  # one block, twice
    with pytest.raises(ValueError, match="out of range"):
        build([{"name": "mwa", "enhancer_layers": [-3]}])  # the text tower has 2 blocks


# --- ITC loss -----------------------------------------------------------------------------------
S = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.5, 0.8]]


def nll(row: list[float], positives: list[int]) -> float:
    """-(1/|P|) sum_{p in P} log softmax(row)_p, by hand."""
    log_z = math.log(sum(math.exp(v) for v in row))
    return -sum(row[p] - log_z for p in positives) / len(positives)


def itc(a, b, scale: float, ids=None) -> torch.Tensor:
    """The retrieval task's ITC loss (the loss MWA trains with) on given embeddings."""
    outputs = {"logits": {"image": a, "text": b, "logit_scale": torch.tensor(scale)}}
    return build_task("retrieval").loss(outputs, {"ids": ids})


def test_itc_loss_equals_hand_computed_value():
    a, b = torch.tensor(S), torch.eye(3)  # a @ b^T = S
    cols = [[S[i][j] for i in range(3)] for j in range(3)]
    want = 0.5 * (sum(nll(S[i], [i]) for i in range(3)) / 3 + sum(nll(cols[j], [j]) for j in range(3)) / 3)
    got = itc(a, b, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.630857, abs=1e-6)  # the number itself, worked out on paper
    scaled = itc(a, b, 2.0)
    assert scaled.item() != pytest.approx(want)


def test_itc_loss_treats_duplicate_ids_as_positives():
    a, b = torch.tensor(S), torch.eye(3)
    ids = [7, 7, 3]  # rows 0 and 1 are the same item (e.g. one image, two captions)
    cols = [[S[i][j] for i in range(3)] for j in range(3)]
    positives = [[0, 1], [0, 1], [2]]
    want = 0.5 * (
        sum(nll(S[i], positives[i]) for i in range(3)) / 3
        + sum(nll(cols[j], positives[j]) for j in range(3)) / 3
    )
    got = itc(a, b, 1.0, ids)
    assert got.item() == pytest.approx(want, rel=1e-6)
    plain = itc(a, b, 1.0)
    assert got.item() != pytest.approx(plain.item())
    # distinct ids are the same as no ids
    same = itc(a, b, 1.0, [0, 1, 2])
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)
