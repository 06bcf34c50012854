"""UniAdapter's module written out from its raw weights (branch and cross-modal outputs), its
initialisation and defaults, the branch names and the keys of shared modules. (Pins the formulas
for `make mutation`; insertion points are pinned in test_uniadapter.py.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from cases import EQUAL, TOY
from mmpeft import build_model
from mmpeft.methods.uniadapter import UniAdapterModule, default_branch


def randomise(module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_branch_and_cross_modal_outputs_equal_their_formulas():
    m = UniAdapterModule(6, 3, ["vision", "text"], cross_branch="text", scale=0.7).double()
    randomise(m)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    h = F.relu(layer_norm(x, m.ln) @ m.down.weight.T + m.down.bias)  # the shared bottleneck
    for branch in ("vision", "text"):
        up = m.up[f"{branch}_branch"]
        torch.testing.assert_close(m(x, branch), 0.7 * (h @ up.weight.T + up.bias))
    both = (
        h @ m.cross_up.weight.T
        + m.cross_up.bias
        + h @ m.up["text_branch"].weight.T
        + m.up["text_branch"].bias
    )
    torch.testing.assert_close(m.cross(x), 0.7 * layer_norm(both, m.cross_ln))


def test_defaults_and_initialisation():
    torch.manual_seed(0)
    m = UniAdapterModule(256, 512, ["vision", "text"], cross_branch="text")
    assert m.scale == 0.1 and m.dropout.p == 0.0  # the released s and dropout
    bound = 1 / math.sqrt(256)  # kaiming_uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert m.down.weight.abs().max() <= bound
    assert m.down.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert not m.down.bias.any()
    for lin in (*m.up.values(), m.cross_up):  # "zero": identity at step 0
        assert not lin.weight.any() and not lin.bias.any()
    official = UniAdapterModule(256, 512, ["vision", "text"], cross_branch="text", init="official")
    assert not official.up["text_branch"].weight.any()
    for lin in (official.up["vision_branch"], official.cross_up):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05) and not lin.bias.any()
    with pytest.raises(ValueError, match="uniadapter: unknown init 'kaiming'; use 'zero' or 'official'"):
        UniAdapterModule(8, 4, ["vision"], init="kaiming")
    with pytest.raises(ValueError, match="cross-modal branch needs the 'text' up-projection"):
        UniAdapterModule(8, 4, ["vision"], cross_branch="text")


def test_default_branch_by_name_then_by_norm_placement():
    assert default_branch("Image", pre_norm=False) == "vision"
    assert default_branch("CAPTION", pre_norm=True) == "text"
    assert default_branch("sensor", pre_norm=True) == "vision"  # pre-LN towers: the ViT-like branch
    assert default_branch("sensor", pre_norm=False) == "text"  # post-LN towers: the BERT-like branch


def test_one_shared_group_per_step_keeps_plain_step_keys():
    # text and image share a width (32), audio (24) is alone: one shared module per step
    encoders = {**EQUAL, "audio": TOY["audio"]}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # audio's width differs: the expected fallback warning
        model = build_model({"encoders": encoders, "methods": [{"name": "uniadapter", "r": 4}], "head": {}})
    shared = model.peft["uniadapter"]["shared"]
    assert sorted(shared) == sorted({"2", "3"})  # text's 2 and image's last 2 blocks, aligned from the end
    assert sorted(model.peft["uniadapter"]["audio"]) == ["0", "1", "2", "3"]


def uniadapter(encoders: dict, **options):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unequal-width fallback warning
        config = {"encoders": encoders, "methods": [{"name": "uniadapter", "r": 4, **options}], "head": {}}
        return build_model(config)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"itc_temperature": 0.0}, "itc_temperature must be positive, got 0.0"),
        ({"branches": {"text": ""}}, "branch of modality 'text' must be a name like 'vision', got ''"),
        ({"branches": {"text": "a.b"}}, "got 'a.b'"),
        ({"branches": {"text": 3}}, "got 3"),
    ],
)
def test_config_values_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        uniadapter(EQUAL, **bad)


def test_config_boundaries_are_allowed():
    uniadapter(EQUAL, r=1, dropout=0.5, itc_temperature=1e-3)


def test_branches_by_option_else_by_name_else_by_norm():
    model = uniadapter(EQUAL, branches={"text": "vision"})
    assert sorted(model.peft["uniadapter"]["shared"]["2"].up) == ["vision_branch"]  # one branch for both
    sensor = uniadapter({"sensor": EQUAL["text"], "image": EQUAL["image"]})  # toy towers are pre-LN
    assert sorted(sensor.peft["uniadapter"]["shared"]["2"].up) == ["vision_branch"]


def test_share_false_and_per_width_groups():
    unshared = uniadapter(EQUAL, share=False)
    assert "shared" not in unshared.peft["uniadapter"]
    assert sorted(unshared.peft["uniadapter"]["text"]) == ["0", "1"]
    assert sorted(unshared.peft["uniadapter"]["image"]) == ["0", "1", "2"]
    # two width groups meeting at one step: one shared module per group, keyed by step and width
    wide = {"type": "toy", "config": {"input_dim": 5, "dim": 24, "depth": 2, "heads": 2}}
    two = uniadapter({**EQUAL, "audio": wide, "depth": wide})
    assert sorted(two.peft["uniadapter"]["shared"]) == ["1_24", "1_32", "2_24", "2_32"]


def test_per_modality_modules_are_registered_and_take_the_init_option():
    model = uniadapter({"text": TOY["text"], "image": TOY["image"]}, init="official")  # unequal widths
    text = model.peft["uniadapter"]["text"]
    assert all(isinstance(text[k], UniAdapterModule) for k in ("0", "1"))
    assert text["0"].up["text_branch"].weight.abs().sum() == 0  # official: the text branch starts at 0
    image = model.peft["uniadapter"]["image"]["0"]
    assert image.up["vision_branch"].weight.abs().sum() > 0  # ... the vision branch does not
    n = sum(p.numel() for p in model.peft["uniadapter"].parameters())
    assert n == sum(sum(p.numel() for p in m.parameters()) for m in model.peft["uniadapter"].modules()
                    if isinstance(m, UniAdapterModule))  # fmt: skip


def test_the_width_fallback_warning_names_each_modality_and_width():
    torch.manual_seed(0)
    config = {
        "encoders": {"text": TOY["text"], "image": TOY["image"]},
        "methods": [{"name": "uniadapter", "r": 4}],
    }
    with pytest.warns(UserWarning, match=r"meet: image \(48\), text \(32\)$"):
        build_model({**config, "head": {}})


def test_no_cross_modal_branch_on_towers_without_cross_attention():
    for module in uniadapter(EQUAL).peft["uniadapter"].modules():
        if isinstance(module, UniAdapterModule):
            assert module.cross_branch is None and not hasattr(module, "cross_up")
