"""MultiWay-Adapter's shared enhancer written out from its raw weights: the FFN with its sub-LN, the
width bridges, its place after its block, which blocks get it, and the defaults that reach the
modules. (Pins the formulas for `make mutation`; the adapters are pinned in test_mwa.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cases import BACKBONES, model_config, toy_batch
from mmpeft import ConfigError, build_model
from mmpeft.encoders.base import EncoderState
from mmpeft.methods.mwa import MWAConfig, SharedEnhancer, WidthBridge, enhance


def randomise(module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def enhancer_by_hand(shared: SharedEnhancer, x: torch.Tensor, subln: bool) -> torch.Tensor:
    """fc2(LN(GELU(fc1 x))) from the raw weights."""
    a = F.gelu(x @ shared.fc1.weight.T + shared.fc1.bias)
    if subln:
        mu, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
        a = (a - mu) / torch.sqrt(var + shared.norm.eps) * shared.norm.weight + shared.norm.bias
    return a @ shared.fc2.weight.T + shared.fc2.bias


@pytest.mark.parametrize("subln", [True, False])
@pytest.mark.parametrize("bridged", [True, False])
def test_enhancer_update_equals_its_formula(subln, bridged):
    torch.manual_seed(0)
    width, dim = 8, 5 if bridged else 8
    shared = SharedEnhancer(width, 6, subln).double()
    bridge = WidthBridge(dim, width).double() if bridged else None
    randomise(shared)
    x = torch.randn(2, 4, dim, dtype=torch.float64)
    out = enhance(shared, bridge)(EncoderState(x)).tokens
    h = x @ bridge.into.weight.T if bridged else x  # into the shared width
    delta = enhancer_by_hand(shared, h, subln)
    if bridged:
        delta = delta @ bridge.out.weight.T  # and back
    torch.testing.assert_close(out, x + delta)


def test_bridges_start_as_an_orthogonal_map_and_its_transpose_without_biases():
    torch.manual_seed(0)
    bridge = WidthBridge(5, 8)
    assert bridge.into.bias is None and bridge.out.bias is None
    w = bridge.into.weight  # (8, 5): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(bridge.out.weight, w.T)


def test_enhancer_defaults_and_zero_init():
    shared = SharedEnhancer(8, 6)
    assert isinstance(shared.norm, torch.nn.LayerNorm) and shared.dropout.p == 0.0
    assert not shared.fc2.weight.any() and not shared.fc2.bias.any()  # identity at init
    assert isinstance(SharedEnhancer(8, 6, subln=False).norm, torch.nn.Identity)


def build(seed: int = 0, **mwa):
    torch.manual_seed(seed)
    return build_model(model_config("pair", [{"name": "mwa", "r": 4, **mwa}])).eval()


def test_enhancer_runs_after_its_block():
    model = build(enhancer_dim=8, enhancer_layers=[-1])
    randomise(model.peft["mwa"]["enhancer"])
    bb = model.backbone
    batch = toy_batch(BACKBONES["pair"])
    with torch.no_grad():
        states = bb.embed(batch)
        for m, enc in bb.encoders.items():
            s = states[m]
            for i in range(enc.num_layers - 1):
                s = bb.run_block(m, i, s)
            last = enc.num_layers - 1
            got = bb.run_block(m, last, s).tokens
            y = enc.run_block(last, s).tokens  # the frozen block alone (the adapters start at zero)
            part = model.peft["mwa"][m]
            h = part["bridges"]["-1"].into(y) if "bridges" in part else y
            delta = enhancer_by_hand(model.peft["mwa"]["enhancer"]["-1"], h, subln=True)
            if "bridges" in part:
                delta = part["bridges"]["-1"].out(delta)
            torch.testing.assert_close(got, y + delta)


def test_every_block_enhancer_skips_blocks_a_shallower_tower_lacks():
    model = build(enhancer_dim=8, enhancer_layers=None)  # text: 2 blocks, image: 3
    assert sorted(model.peft["mwa"]["enhancer"]) == ["-1", "-2", "-3"]
    after = model.backbone._after
    assert sorted(i for (m, i), fns in after.items() if m == "text" and fns) == [0, 1]
    assert sorted(i for (m, i), fns in after.items() if m == "image" and fns) == [0, 1, 2]


def test_enhancer_hidden_width_follows_the_ffn_of_a_tower_of_its_width():
    model = build(enhancer_dim=None)  # widths 32 and 48: the shared space is 48 wide, like image
    image_fc1 = model.backbone.encoders["image"].linears(2)["fc1"]
    assert model.peft["mwa"]["enhancer"]["-1"].fc1.out_features == image_fc1.out_features
    other = build(enhancer_dim=None, enhancer_width=40)  # no tower is 40 wide: 4 x width
    assert other.peft["mwa"]["enhancer"]["-1"].fc1.out_features == 160


def test_dropout_options_reach_the_modules():
    model = build(dropout=0.2, enhancer_dropout=0.3)
    assert model.peft["mwa"]["enhancer"]["-1"].dropout.p == 0.3
    ps = {m.p for m in model.peft["mwa"]["text"].modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.2}


@pytest.mark.parametrize("name", ["r", "enhancer_dim", "enhancer_width"])
def test_sizes_must_be_positive(name):
    with pytest.raises(ConfigError, match=f"mwa: {name} must be >= 1, got 0"):
        MWAConfig(**{name: 0})
    MWAConfig(**{name: 1})


def test_a_modality_named_like_the_shared_container_is_refused():
    config = model_config("pair", [{"name": "mwa", "r": 4}])
    config["encoders"]["enhancer"] = config["encoders"].pop("image")
    with pytest.raises(ValueError, match="mwa: a modality may not be named 'enhancer'"):
        build_model(config)
