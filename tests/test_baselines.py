"""Method-specific checks of the baselines bitfit, adapter, adaptformer, prompt, tfn and lmf."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cases import BACKBONES, model_config, toy_batch
from mmpeft import build_model
from mmpeft.config import ConfigError
from mmpeft.encoders.base import additive_attention_mask
from mmpeft.methods.adapter import adapter_params
from mmpeft.methods.adaptformer import AdaptFormerConfig
from mmpeft.methods.tfn import append_one


def build(backbone: str, method: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config(backbone, [method]))


def randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every trainable tensor away from its (often zero) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


# --- tfn / lmf ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["pair", "triple"])
def test_tfn_is_the_flattened_outer_product(backbone):
    model = build(backbone, {"name": "tfn", "proj_dim": 2}).eval()
    batch = toy_batch(BACKBONES[backbone])
    fusion = model.peft["tfn"]
    with torch.no_grad():
        states = model.backbone(batch)
        z = [append_one(fusion.proj[m](model.backbone.encoders[m].pool(states[m]))) for m in states]
        if len(z) == 2:
            expected = torch.einsum("bi,bj->bij", *z).flatten(1)  # (B, 9)
        else:
            expected = torch.einsum("bi,bj,bk->bijk", *z).flatten(1)  # (B, 27)
        got = model(batch)["features"]
    assert fusion.out_dim == 3 ** len(z) == got.shape[1]
    torch.testing.assert_close(got, expected)
    # the unimodal terms survive: the entries paired with the other modalities' constant 1
    torch.testing.assert_close(
        got.view(-1, *[3] * len(z))[(slice(None), slice(0, 2)) + (2,) * (len(z) - 1)], z[0][:, :2]
    )


def test_tfn_refuses_an_exploding_width():
    with pytest.raises(ConfigError, match="fused width of 35,937 > max_dim 10,000"):
        build("triple", {"name": "tfn", "proj_dim": 32, "max_dim": 10_000})


def test_tfn_needs_two_modalities():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        build("pair", {"name": "tfn", "modalities": ["text"]})


def test_lmf_equals_the_full_tensor_contraction():
    model = build("triple", {"name": "lmf", "proj_dim": 2, "rank": 3, "out_dim": 4}).eval()
    batch = toy_batch(BACKBONES["triple"])
    fusion = model.peft["lmf"]
    randomise(fusion, 0.1)  # non-zero bias too
    with torch.no_grad():
        states = model.backbone(batch)
        z = [append_one(fusion.proj[m](model.backbone.encoders[m].pool(states[m]))) for m in states]
        f = [fusion.factors[m] for m in states]  # 3 x (R, P+1, O)
        w = fusion.rank_weights[0]  # (R,)
        W = torch.einsum("r,rao,rbo,rco->abco", w, *f)  # the CP-reconstructed (P+1, P+1, P+1, O) weight
        Z = torch.einsum("na,nb,nc->nabc", *z)  # the TFN tensor (B, P+1, P+1, P+1)
        expected = torch.einsum("nabc,abco->no", Z, W) + fusion.bias
        got = model(batch)["features"]
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- prompt -------------------------------------------------------------------------------------
def record_block_inputs(model):
    """Forward pre-hooks on every block: {(modality, i): [input tokens]}."""
    seen, handles = {}, []
    for m, enc in model.backbone.encoders.items():
        for i in range(enc.num_layers):

            def hook(mod, args, key=(m, i)):
                seen.setdefault(key, []).append(args[0].detach().clone())

            handles.append(enc.block(i).register_forward_pre_hook(hook))
    return seen, handles


@pytest.mark.parametrize("deep", [True, False])
def test_prompts_replace_and_never_accumulate(deep):
    P = 3
    model = build("triple", {"name": "prompt", "num_prompts": P, "deep": deep}).eval()
    batch = toy_batch(BACKBONES["triple"])
    seen, handles = record_block_inputs(model)
    with torch.no_grad():
        embedded = model.backbone.embed(batch)
        states = model.backbone(batch)
    for h in handles:
        h.remove()
    for m, enc in model.backbone.encoders.items():
        T, a = embedded[m].tokens.shape[1], embedded[m].n_prefix
        prompts = model.peft["prompt"][m].tokens  # (n_sets, P, D)
        assert prompts.shape[0] == (enc.num_layers if deep else 1)
        for i in range(enc.num_layers):
            x = seen[(m, i)][0]  # (B, T + P, D)
            assert x.shape[1] == T + P, (m, i)
            fresh = torch.allclose(x[:, a : a + P], prompts[i if deep else 0].expand_as(x[:, a : a + P]))
            assert fresh == (deep or i == 0), (m, i)  # deep: the block sees this layer's own prompts
        assert states[m].tokens.shape[1] == T + P and states[m].n_prompt == P
        assert states[m].pad_mask.shape == states[m].tokens.shape[:2]
        assert not states[m].pad_mask[:, a : a + P].any()  # prompts are attendable
        torch.testing.assert_close(
            states[m].pad_mask[:, a + P :], embedded[m].pad_mask[:, a:], rtol=0, atol=0
        )


def test_prompt_on_the_last_block_leaves_the_prefix_without_autograd():
    model = build("pair", {"name": "prompt", "num_prompts": 2, "layers": [-1]}).train()
    batch = toy_batch(BACKBONES["pair"])
    grad_on, handles = {}, []
    for m, enc in model.backbone.encoders.items():
        for i in range(enc.num_layers):

            def hook(mod, args, out, key=(m, i)):
                grad_on[key] = torch.is_grad_enabled()

            handles.append(enc.block(i).register_forward_hook(hook))
    model(batch)["logits"].sum().backward()
    for h in handles:
        h.remove()
    assert grad_on == {
        ("text", 0): False,
        ("text", 1): True,
        ("image", 0): False,
        ("image", 1): False,
        ("image", 2): True,
    }
    for m in ("text", "image"):
        assert model.peft["prompt"][m].tokens.grad.abs().sum() > 0


def test_prompt_without_pad_mask_stays_unpadded():
    model = build("pair", {"name": "prompt", "num_prompts": 2}).eval()
    batch = {m: x["values"] for m, x in toy_batch(BACKBONES["pair"]).items()}  # no attention masks
    with torch.no_grad():
        states = model.backbone(batch)
    assert all(s.pad_mask is None and s.n_prompt == 2 for s in states.values())


# --- adapter / adaptformer ----------------------------------------------------------------------
@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_parameter_count_has_its_closed_form(placement, per_block):
    r = 5
    model = build("triple", {"name": "adapter", "r": r, "placement": placement})
    got = sum(p.numel() for p in model.peft["adapter"].parameters())
    dims_depths = [(32, 2), (48, 3), (24, 4)]
    expected = sum(per_block * depth * (2 * d * r + r + d) for d, depth in dims_depths)
    assert got == expected
    assert adapter_params(32, r) == 2 * 32 * r + r + 32


def test_adapter_houlsby_adds_a_residual_bottleneck_after_o_and_fc2():
    model = build("pair", {"name": "adapter", "r": 4, "activation": "gelu", "scale": 0.5}).eval()
    randomise(model.peft["adapter"])
    blk = model.backbone.encoders["text"].block(0)
    ad = model.peft["adapter"]["text"]["0"]
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        got = blk.o(x)
        with model.adapters_disabled():
            h = blk.o(x)
        expected = h + 0.5 * (
            F.gelu(h @ ad["o"].down.weight.T + ad["o"].down.bias) @ ad["o"].up.weight.T + ad["o"].up.bias
        )
    torch.testing.assert_close(got, expected)


def manual_preln_block(blk, x, pad_mask, adapter_input_fn, adapter, s):
    """One pre-LN toy block with an AdaptFormer branch, written out by hand."""
    xp = x + blk.attention(blk.ln1(x), additive_attention_mask(pad_mask, x.dtype))  # x' (B, T, D)
    ffn = blk.fc2(F.gelu(blk.fc1(blk.ln2(xp))))
    h = F.relu(adapter_input_fn(xp) @ adapter.down.weight.T + adapter.down.bias)  # (B, T, r)
    return xp + ffn + s * (h @ adapter.up.weight.T + adapter.up.bias)


def test_adaptformer_adds_the_scaled_parallel_branch_on_pre_ln():
    s = 0.25
    model = build("pair", {"name": "adaptformer", "r": 4, "scale": s}).eval()
    randomise(model.peft["adaptformer"])
    batch = toy_batch(BACKBONES["pair"])
    enc = model.backbone.encoders["text"]
    assert enc.pre_norm
    with torch.no_grad():
        state = model.backbone.embed(batch)["text"]
        got = model.backbone.run_block("text", 0, state).tokens
        with model.adapters_disabled():
            blk = enc.block(0)
            expected = manual_preln_block(
                blk, state.tokens, state.pad_mask, lambda t: t, model.peft["adaptformer"]["text"]["0"], s
            )
            frozen = enc.run_block(0, state).tokens
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, frozen)


def test_adaptformer_reads_fc1_input_on_post_ln_encoders():
    torch.manual_seed(0)
    model = build_model(model_config("pair", [])).eval()
    enc = model.backbone.encoders["text"]
    enc.pre_norm = False  # pretend post-LN: the adapter must now read fc1's input, LN(x') here
    model.attach("adaptformer", AdaptFormerConfig(r=4, scale=0.5, modalities=["text"], layers=[0]))
    model.eval()  # the adapter was attached after eval(): switch its dropout off too
    randomise(model.peft["adaptformer"])
    state = model.backbone.embed(toy_batch(BACKBONES["pair"]))["text"]
    with torch.no_grad():
        got = model.backbone.run_block("text", 0, state).tokens
        with model.adapters_disabled():
            blk = enc.block(0)
            expected = manual_preln_block(
                blk, state.tokens, state.pad_mask, blk.ln2, model.peft["adaptformer"]["text"]["0"], 0.5
            )
    torch.testing.assert_close(got, expected)


# --- bitfit -------------------------------------------------------------------------------------
def test_bitfit_equals_training_the_biases():
    model = build("pair", {"name": "bitfit"}).eval()
    randomise(model.peft["bitfit"])
    batch = toy_batch(BACKBONES["pair"])
    with torch.no_grad():
        got = model.backbone(batch)
        for m, per_layer in model.peft["bitfit"].items():  # write the deltas into the frozen biases
            enc = model.backbone.encoders[m]
            for i, deltas in per_layer.items():
                modules = {**enc.linears(int(i)), **enc.norms(int(i))}
                assert set(deltas) == set(modules)  # default: every linear and norm of the block
                for name, d in deltas.items():
                    modules[name].bias.add_(d.delta)
        with model.adapters_disabled():
            expected = model.backbone(batch)
    for m in got:
        torch.testing.assert_close(got[m].tokens, expected[m].tokens, rtol=1e-5, atol=1e-5)


def test_bitfit_counts_and_errors():
    model = build("pair", {"name": "bitfit", "targets": ["q", "fc1"], "include_norms": False, "layers": [-1]})
    # text: q (32) + fc1 (64); image: q (48) + fc1 (96)
    assert sum(p.numel() for p in model.peft["bitfit"].parameters()) == 32 + 64 + 48 + 96
    with pytest.raises(ValueError, match="encoder 'text' has no linear 'qv'"):
        build("pair", {"name": "bitfit", "targets": ["qv"]})
