"""Wander written out from its raw weights, independently of the module's forward: the fusion with
padding and prompts, the per-layer broadcast, the post-placement residuals and outputs, the
initialisation scales, and how sequence lengths are found. (These pin the formulas: a flipped
sign, a dropped scale or a wrong end of a sequence fails here; see `make mutation`.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cases import model_config
from mmpeft import build_model
from mmpeft.encoders.base import EncoderState
from mmpeft.encoders.features import FeatureTransformerConfig
from mmpeft.methods.wander import (
    GELU_SECOND_MOMENT,
    Wander,
    WanderConfig,
    WanderCore,
    WanderFusion,
    WanderLayer,
    encoder_max_tokens,
    max_lengths,
)

DIMS, LENGTHS = {"a": 6, "b": 5}, {"a": 7, "b": 4}


def randomise(module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def padded_states() -> dict[str, EncoderState]:
    """'a': 1 prefix token, 2 inserted prompts, 5 tokens, example 1 padded in its last 2;
    'b': 4 tokens, example 0 padded in its last one."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    pad_a = torch.zeros(2, 8, dtype=torch.bool)
    pad_a[1, -2:] = True
    b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    pad_b = torch.zeros(2, 4, dtype=torch.bool)
    pad_b[0, -1] = True
    return {"a": EncoderState(a, pad_a, n_prefix=1, n_prompt=2), "b": EncoderState(b, pad_b)}


def without_prompts(s: EncoderState) -> tuple[torch.Tensor, torch.Tensor]:
    keep = [i for i in range(s.tokens.shape[1]) if not s.n_prefix <= i < s.n_prefix + s.n_prompt]
    return s.tokens[:, keep], s.pad_mask[:, keep]


def reference_fusion(core: WanderCore, states: dict[str, EncoderState], exact: bool) -> torch.Tensor:
    """F (B, k, d): per component i, the product over modalities of S_m^(i)^T Z_m A_m^(i)."""
    R = core.factors["a"].A.shape[0]
    zs = {}
    for m, f in core.factors.items():
        x, pad = without_prompts(states[m])
        z = F.gelu(x @ f.down.weight.T + f.down.bias)
        zs[m] = z * (~pad).unsqueeze(-1)  # padded rows contribute nothing
    if not exact:  # the released form: sum the components inside each factor, then multiply
        out = 1.0
        for m, f in core.factors.items():
            T = zs[m].shape[1]
            out = out * torch.einsum("tk,btr,rd->bkd", f.S.sum(0)[:T], zs[m], f.A.sum(0))
        return out
    total = 0.0
    for i in range(R):
        prod = 1.0
        for m, f in core.factors.items():
            T = zs[m].shape[1]
            prod = prod * torch.einsum("tk,btr,rd->bkd", f.S[i, :T], zs[m], f.A[i])
        total = total + core.lam[i] * prod
    return total


@pytest.mark.parametrize("exact", [True, False])
def test_per_layer_update_equals_its_formula_with_padding_and_prompts(exact):
    core = WanderCore(DIMS, LENGTHS, k=3, r=4, d=6, rank=2, token_rank=2, exact=exact).double()
    layer = WanderLayer(core, DIMS).double()
    randomise(layer)  # U_m != 0
    states = padded_states()
    out = layer(0, states)
    fused = reference_fusion(core, states, exact)  # (B, k, d)
    for m, f in core.factors.items():
        x, pad = without_prompts(states[m])
        T = x.shape[1]
        token_map = f.S[:, :T].sum(0) / (math.sqrt(f.S.shape[0]) if exact else 1.0)  # (T, k)
        delta = torch.einsum("tk,bkd,de->bte", token_map, fused, layer.up[m])  # (B, T, d_m)
        delta = delta * (~pad).unsqueeze(-1)
        s = states[m]
        a = s.n_prefix
        expected = s.tokens.clone()
        expected[:, :a] += delta[:, :a]
        expected[:, a + s.n_prompt :] += delta[:, a:]  # prompt rows are left alone
        torch.testing.assert_close(out[m].tokens, expected)
        assert out[m].n_prompt == s.n_prompt and torch.equal(out[m].pad_mask, s.pad_mask)


class Pool:
    """A stand-in backbone whose anchor pools by the mean of its non-prompt tokens."""

    def __init__(self):
        self.encoders = {"a": SimpleNamespace(pool=lambda s: without_prompts(s)[0].mean(1))}


@pytest.mark.parametrize("residual", ["anchor", "pooled", "none"])
@pytest.mark.parametrize("output", ["first", "mean"])
def test_post_placement_equals_its_formula(residual, output):
    k = 8  # longer than the anchor's 6 tokens (prefix + 5): the anchor residual is zero past them
    core = WanderCore(DIMS, LENGTHS, k=k, r=4, d=6, rank=2, token_rank=2, exact=True).double()
    fusion = WanderFusion(core, "a", residual, output).double()
    randomise(fusion)  # gate != 0
    states = padded_states()
    x, pad = without_prompts(states["a"])  # (B, 6, d)
    if residual == "anchor":
        res = torch.zeros(2, k, 6, dtype=torch.float64)
        res[:, :6] = x * (~pad).unsqueeze(-1)
    elif residual == "pooled":
        res = x.mean(1, keepdim=True).expand(2, k, 6)
    else:
        res = torch.zeros(2, k, 6, dtype=torch.float64)
    y = res + fusion.gate * reference_fusion(core, states, exact=True)
    expected = y[:, 0] if output == "first" else y.mean(1)
    torch.testing.assert_close(fusion(states, Pool()), expected)


def test_gelu_second_moment_is_what_its_name_says():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    moment = torch.trapezoid(F.gelu(x) ** 2 * density, x).item()
    assert GELU_SECOND_MOMENT == pytest.approx(moment, abs=2e-3)


def std(t: torch.Tensor) -> float:
    return t.detach().double().std().item()


def test_initialisation_scales_give_unit_variance_factors():
    torch.manual_seed(0)
    dims, lengths, r = {"a": 256, "b": 64}, {"a": 300, "b": 50}, 32
    exact = WanderCore(dims, lengths, k=16, r=r, d=128, rank=3, token_rank=2, exact=True)
    assert exact.lam.tolist() == pytest.approx([3**-0.5] * 3)
    for m, f in exact.factors.items():
        assert f.S.shape == (3, lengths[m], 16)  # exact mode: token_rank is the rank
        assert std(f.down.weight) == pytest.approx(dims[m] ** -0.5, rel=0.05)
        assert not f.down.bias.any()
        assert std(f.S) == pytest.approx(lengths[m] ** -0.5, rel=0.05)
        assert std(f.A) == pytest.approx((GELU_SECOND_MOMENT * r) ** -0.5, rel=0.05)
    summed = WanderCore(dims, lengths, k=16, r=r, d=128, rank=3, token_rank=2, exact=False)
    assert summed.lam is None
    for m, f in summed.factors.items():  # n summed components each carry 1/n of the variance
        assert f.S.shape == (2, lengths[m], 16)
        assert std(f.S) == pytest.approx((lengths[m] * 2) ** -0.5, rel=0.05)
        assert std(f.A) == pytest.approx((GELU_SECOND_MOMENT * r * 3) ** -0.5, rel=0.05)
    fusion, layer = WanderFusion(exact, "a", "anchor", "first"), WanderLayer(exact, dims)
    assert not fusion.gate.any() and not any(u.any() for u in layer.up.values())


def encoder(**attrs):
    return SimpleNamespace(model=SimpleNamespace(config=attrs.pop("config", None)), **attrs)


def test_sequence_lengths_are_read_from_each_encoder_family():
    assert encoder_max_tokens(encoder(max_tokens=7, max_positions=9)) == 7
    assert encoder_max_tokens(encoder(max_positions=9)) == 9
    with_cls = FeatureTransformerConfig(max_len=10, cls_token=True)
    assert encoder_max_tokens(encoder(config=with_cls)) == 11
    assert encoder_max_tokens(encoder(config=FeatureTransformerConfig(max_len=10, cls_token=False))) == 10
    assert encoder_max_tokens(encoder(config=SimpleNamespace(max_position_embeddings=512))) == 512
    vit = SimpleNamespace(image_size=224, patch_size=16)
    assert encoder_max_tokens(encoder(config=vit)) == 14**2 + 1  # patches + CLS
    assert encoder_max_tokens(encoder(config=vit, n_prefix=5)) == 14**2 + 5  # + registers
    assert encoder_max_tokens(encoder(config=SimpleNamespace(image_size=224))) is None
    assert encoder_max_tokens(SimpleNamespace(model=SimpleNamespace())) is None


def test_max_len_option_overrides_and_is_checked():
    encoders = {"a": encoder(max_tokens=7), "b": encoder()}
    with pytest.raises(ValueError, match="longest sequence of modality 'b'; set max_len: {b: N}"):
        max_lengths(WanderConfig(), encoders, ["a", "b"])
    assert max_lengths(WanderConfig(max_len={"b": 1}), encoders, ["a", "b"]) == {"a": 7, "b": 1}
    assert max_lengths(WanderConfig(max_len=3), encoders, ["a", "b"]) == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="modality 'a'"):
        max_lengths(WanderConfig(max_len=0), encoders, ["a", "b"])
    with pytest.raises(ValueError, match="modality 'a'"):
        max_lengths(WanderConfig(max_len={"a": "x"}), encoders, ["a"])


def wander(**options):
    torch.manual_seed(0)
    return build_model(model_config("pair", [{"name": "wander", **options}]))


@pytest.mark.parametrize("name", ["k", "r", "rank"])
def test_sizes_must_be_positive(name):
    with pytest.raises(ValueError, match=f"wander: {name} must be >= 1, got 0"):
        wander(**{name: 0})
    assert wander(**{name: 1}) is not None


def test_attach_builds_the_configured_mode_and_layers():
    assert wander(cp_mode="exact").peft["wander"].core.exact is True
    assert wander(cp_mode="factor_sum", rank=2, token_rank=3).peft["wander"].core.lam is None
    with pytest.raises(ValueError, match="token_rank differs from rank only in cp_mode='factor_sum'"):
        wander(cp_mode="exact", rank=2, token_rank=3)
    layered = wander(layers=[-1]).peft["wander"]
    assert list(layered) == ["1"]  # the last of the anchor (text) tower's 2 blocks
    assert list(wander(layers=[-2, -1]).peft["wander"]) == ["0", "1"]
    assert Wander.block_use(WanderConfig()) == "" and Wander.block_use(WanderConfig(layers=[-1])) == "some"


@pytest.mark.parametrize("exact", [True, False])
def test_an_absent_modality_leaves_the_product(exact):
    """Rows lacking 'b' (model.missing=zeros) fuse 'a' alone: the product over the present
    modalities; with masks_absent off (a learned placeholder) they fuse like any row."""
    core = WanderCore(DIMS, LENGTHS, k=3, r=4, d=6, rank=2, token_rank=2, exact=exact).double()
    randomise(core)
    states = padded_states()
    absent = {"b": torch.tensor([True, False])}
    marked = {m: s.replace(absent=absent) for m, s in states.items()}
    fusion = WanderFusion(core, "a", "none", "first").double()
    randomise(fusion)
    alone = WanderCore({"a": 6}, {"a": 7}, k=3, r=4, d=6, rank=2, token_rank=2, exact=exact).double()
    alone.factors["a"].load_state_dict(core.factors["a"].state_dict())
    if exact:
        alone.lam.data.copy_(core.lam.data)
    got = fusion(marked, Pool())
    torch.testing.assert_close(got[0], fusion.gate * reference_fusion(alone, {"a": states["a"]}, exact)[0, 0])
    torch.testing.assert_close(got[1], fusion(states, Pool())[1])
    fusion.masks_absent = False
    torch.testing.assert_close(fusion(marked, Pool()), fusion(states, Pool()))
