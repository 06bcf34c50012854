"""Wander: the fusion formulas against independent computations, masking, init and placements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cases import BACKBONES, model_config, toy_batch
from mmpeft import ENCODERS, build_model
from mmpeft.encoders.base import EncoderState
from mmpeft.methods.wander import WanderCore, WanderFusion


def wander_model(backbone: str = "pair", **options):
    torch.manual_seed(0)
    return build_model(model_config(backbone, [{"name": "wander", **options}]))


def random_states(lengths: dict, dims: dict, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        m: EncoderState(torch.randn(batch, lengths[m], dims[m], generator=g, dtype=torch.float64))
        for m in dims
    }


def randomise(module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def test_factor_sum_equals_the_released_formula():
    dims, lengths = {"t": 6, "a": 6, "v": 6}, {"t": 5, "a": 4, "v": 7}
    k, r, d = 3, 4, 6  # the released code needs one width for all modalities (d = dim)
    core = WanderCore(dims, lengths, k, r, d, rank=2, token_rank=3, exact=False).double()
    fusion = WanderFusion(core, anchor="t", residual="anchor", output="first").double()
    randomise(fusion)
    states = random_states(lengths, dims)
    ours = fusion.fused(states, backbone=None)  # (B, k, d)

    # the released adapter: per modality the components are summed first, then multiplied
    product = None
    for m, f in core.factors.items():
        z = F.gelu(states[m].tokens @ f.down.weight.t() + f.down.bias)  # (B, T, r)
        w_feature = f.A.sum(dim=0)  # (r, d)
        w_token = f.S.sum(dim=0)  # (T, k)
        term = ((z @ w_feature).permute(0, 2, 1) @ w_token).permute(0, 2, 1)  # (B, k, d)
        product = term if product is None else product * term
    original = torch.cat([states[m].tokens for m in dims], dim=1)  # anchor first: its first k tokens
    released = original[:, :k] + fusion.gate * product
    torch.testing.assert_close(ours, released)


@pytest.mark.parametrize("k", [2, 7])  # k = 7 exceeds some T_m: the other contraction order runs
def test_exact_mode_equals_the_outer_product_contraction(k):
    dims, lengths = {"a": 3, "b": 5, "c": 4}, {"a": 3, "b": 2, "c": 4}
    r, d, R = 2, 3, 2
    core = WanderCore(dims, lengths, k, r, d, rank=R, token_rank=R, exact=True).double()
    randomise(core)
    states = random_states(lengths, dims)
    zs = core.project({m: (s.tokens, None) for m, s in states.items()})
    ours = core.fuse(zs)  # (B, k, d)

    vec = [zs[m].flatten(1) for m in dims]  # vec(Z_m): (B, T_m * r)
    outer = torch.einsum("ba,bc,be->bace", *vec)  # the full outer product (B, T_a r, T_b r, T_c r)
    # CP-reconstructed weight W[(t_m, c_m)_m, k, j] = sum_i lambda_i prod_m S_m^(i)[t_m, k] A_m^(i)[c_m, j]
    modes = []
    for m in dims:
        f = core.factors[m]
        w = torch.einsum("itk,icj->itckj", f.S, f.A)  # (R, T_m, r, k, d)
        modes.append(w.reshape(R, -1, k, d))  # (R, T_m r, k, d)
    weight = torch.einsum("i,iakj,ickj,iekj->acekj", core.lam, *modes)
    explicit = torch.einsum("bace,acekj->bkj", outer, weight)
    torch.testing.assert_close(ours, explicit)


@pytest.mark.parametrize("options", [{}, {"layers": [-1]}, {"residual": "pooled", "cp_mode": "factor_sum"}])
def test_padded_rows_do_not_affect_the_output(options):
    model = wander_model(k=8, r=4, rank=2, **options).eval()  # k exceeds the text length: rows past it too
    with torch.no_grad():
        for p in model.peft.parameters():
            p.add_(0.3)  # non-zero gate / up-projections, so F reaches the output
        batch = toy_batch(BACKBONES["pair"])
        before = model(batch)["logits"]
        for inputs in batch.values():
            pad = inputs["attention_mask"] == 0
            inputs["values"][pad] = 100.0 * torch.randn_like(inputs["values"][pad])
        after = model(batch)["logits"]
    torch.testing.assert_close(before, after)


def test_too_long_input_is_a_clear_error():
    model = wander_model(k=2, r=4, rank=2, max_len={"text": 4})
    with pytest.raises(ValueError, match="'text' has 6 tokens .* at most 4"):
        model(toy_batch(BACKBONES["pair"]))


def test_unknown_length_and_bad_anchor_are_named():
    with pytest.raises(ValueError, match="max_len names modalities \\['video'\\]"):
        wander_model(max_len={"video": 3})
    with pytest.raises(ValueError, match="anchor 'audio'"):
        wander_model(anchor="audio")
    with pytest.raises(ValueError, match="needs d == the anchor 'text' width 32"):
        wander_model(d=20)


def test_identity_at_init_and_every_parameter_learns():
    model = wander_model("triple", k=3, r=4, rank=2)
    batch = toy_batch(BACKBONES["triple"])
    out = model(batch)
    # Y = residual at step 0: the features are the anchor's (text) first token, after the final norm
    torch.testing.assert_close(out["features"], out["states"]["text"].tokens[:, 0], rtol=0, atol=0)
    params = dict(model.peft["wander"].named_parameters())
    got = dict.fromkeys(params, False)
    opt = torch.optim.Adam(model.peft.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(batch)["logits"].square().mean().backward()
        for n, p in params.items():
            got[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    assert all(got.values()), [n for n, ok in got.items() if not ok]


def test_the_released_all_zero_token_factors_never_learn():
    """Why we do not copy the released init: S = 0 gives every adapter parameter zero gradient."""
    model = wander_model(k=3, r=4, rank=2, cp_mode="factor_sum")
    fusion = model.peft["wander"]
    with torch.no_grad():
        fusion.gate.fill_(1.0)  # the released code has no gate
        for f in fusion.core.factors.values():
            f.S.zero_()
    opt = torch.optim.Adam(fusion.core.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(toy_batch(BACKBONES["pair"]))["logits"].square().mean().backward()
        assert all(p.grad is None or not p.grad.any() for p in fusion.core.parameters())
        opt.step()


def test_per_layer_placement_preserves_shapes_and_starts_as_identity():
    model = wander_model("triple", k=2, r=4, rank=2, layers=[-2, -1]).eval()
    assert sorted(model.peft["wander"]) == ["0", "1"]  # text (the anchor) has 2 blocks
    batch = toy_batch(BACKBONES["triple"])
    with torch.no_grad():
        with model.adapters_disabled():
            frozen = model.backbone(batch)
        start = model.backbone(batch)
        for layer in model.peft["wander"].values():
            for u in layer.up.values():
                u.normal_()
        moved = model.backbone(batch)
    for m in frozen:
        assert start[m].tokens.shape == moved[m].tokens.shape == frozen[m].tokens.shape
        assert torch.equal(start[m].tokens, frozen[m].tokens)
        assert not torch.allclose(moved[m].tokens, frozen[m].tokens)
    assert model.backbone.first_trainable_step() == 2


def test_fused_width_option_with_encoders_of_different_widths():
    model = wander_model("triple", k=3, r=4, rank=2, d=20, residual="none", output="mean")
    out = model(toy_batch(BACKBONES["triple"]))
    assert out["features"].shape == (3, 20)
    assert model.peft["wander"].core.factors["image"].down.in_features == 48


def test_token_rank_is_only_for_factor_sum():
    with pytest.raises(ValueError, match="token_rank"):
        wander_model(rank=2, token_rank=3)
    model = wander_model(rank=2, token_rank=3, cp_mode="factor_sum")
    assert model.peft["wander"].core.factors["text"].S.shape[0] == 3


@pytest.mark.skipif(
    "hf_bert" not in ENCODERS or "hf_vit" not in ENCODERS, reason="hf_bert / hf_vit are not registered"
)
def test_sequence_lengths_come_from_hf_encoders():
    encoders = {
        "text": {"type": "hf_bert", "config": {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "intermediate_size": 40,
                                               "max_position_embeddings": 16}},
        "image": {"type": "hf_vit", "config": {"hidden_size": 24, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "intermediate_size": 30,
                                               "image_size": 16, "patch_size": 8}},
    }  # fmt: skip
    torch.manual_seed(0)
    model = build_model({"encoders": encoders, "methods": [{"name": "wander", "k": 2, "r": 4, "rank": 2}]})
    factors = model.peft["wander"].core.factors
    assert factors["text"].S.shape[1] == 16  # BERT positions
    assert factors["image"].S.shape[1] == 5  # 2 x 2 patches + CLS
    batch = {
        "text": {
            "input_ids": torch.randint(0, 50, (2, 7)),
            "attention_mask": torch.ones(2, 7, dtype=torch.long),
        },
        "image": torch.randn(2, 3, 16, 16),
    }
    assert model(batch)["features"].shape == (2, 32)


@pytest.mark.parametrize("name", ["wander-mosi", "wander-food101"])
def test_presets_validate(name):
    from mmpeft.run_config import config_folder, read_yaml, validate_run_config

    run = validate_run_config(read_yaml(str(config_folder().joinpath(f"{name}.yaml"))))
    (method,) = run.config["model"]["methods"]
    assert method["name"] == "wander" and method["cp_mode"] == "factor_sum" and method["k"] == method["r"]
