"""The block rule: towers without transformer blocks (a ``timm_cnn`` feature grid) next to ones with.

For every registered method: under ``modalities: None`` a method that acts in blocks adapts only
the towers with blocks and warns once naming the skipped one; naming the block-less tower is an
error naming it; PMF (blocks in every tower) is an error saying why; ``applicable_methods`` (from
the config, nothing built) agrees with what ``attach`` does. Loops over the registry, so a new
method is covered.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("timm")

from cases import METHOD_CASES, TOY, VIDEO_METHODS, toy_batch  # noqa: E402
from mmpeft import METHODS, build_model  # noqa: E402
from mmpeft.cli.main import main as cli_main  # noqa: E402
from mmpeft.methods.applicability import applicable_methods, check_applicable, tower_infos  # noqa: E402

B = 2
CNN = {"type": "timm_cnn", "config": {}}  # tiny random EfficientNet (timm's test_efficientnet)
PAIR = {"text": TOY["text"], "image": CNN}
TRIPLE = {"text": TOY["text"], "audio": TOY["audio"], "image": CNN}


def cases() -> list[str]:
    """One case per option family of every registered method, without hand-narrowed modalities."""
    out = [c for c, o in METHOD_CASES.items() if c.split(":")[0] in METHODS and "modalities" not in o]
    out += [m for m in METHODS.names() if m not in METHOD_CASES]
    return [c for c in out if c.split(":")[0] not in VIDEO_METHODS]  # these need a video tower


def entry(case: str, **extra) -> dict:
    return {"name": case.split(":")[0], **METHOD_CASES.get(case, {}), **extra}


def config(encoders: dict, methods: list[dict]) -> dict:
    return {"encoders": copy.deepcopy(encoders), "methods": methods, "head": {"num_outputs": 3}}


def batch_for(encoders: dict) -> dict:
    toys = {m: s for m, s in encoders.items() if s["type"] == "toy"}
    batch = toy_batch(toys, batch_size=B)
    g = torch.Generator().manual_seed(1)
    batch.update({m: torch.randn(B, 3, 64, 64, generator=g) for m, s in encoders.items() if s == CNN})
    return batch


def build(cfg: dict):
    """(model or None, the error or None, the block warnings)."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model, error = build_model(cfg), None
        except ValueError as e:
            model, error = None, e
    return model, error, [str(w.message) for w in caught if "no transformer blocks" in str(w.message)]


def block_use(case: str) -> str:
    method = METHODS.get(case.split(":")[0])
    return method.block_use(method.config_class(**METHOD_CASES.get(case, {})))


def adapted_modalities(container) -> set[str]:
    names = {n for n, p in container.named_parameters()}
    return {m for m in PAIR if any(m in n.split(".") for n in names)}


@pytest.mark.parametrize("case", cases())
def test_modalities_none_skips_the_cnn_tower(case):
    method = METHODS.get(case.split(":")[0])
    model, error, warned = build(config(PAIR, [entry(case)]))
    use = block_use(case)
    if use == "every" or (use == "some" and method.min_modalities > 1):
        assert error is not None and "encoder 'image' (timm_cnn) has no transformer blocks" in str(error)
        return
    assert error is None, error
    if use == "some":
        assert len(warned) == 1 and "encoder 'image'" in warned[0] and "(timm_cnn)" in warned[0]
        assert adapted_modalities(model.peft[method.name]) == {"text"}
    else:
        assert warned == []
    out = model(batch_for(PAIR))
    assert out["logits"].shape == (B, 3) and torch.isfinite(out["logits"]).all()
    out["logits"].sum().backward()


@pytest.mark.parametrize("case", [c for c in cases() if block_use(c)])
def test_naming_the_cnn_tower_is_an_error_naming_it(case):
    _, error, _ = build(config(PAIR, [entry(case, modalities=["text", "image"])]))
    assert isinstance(error, ValueError)
    assert "encoder 'image' (timm_cnn) has no transformer blocks" in str(error)


def test_pmf_says_why_and_what_to_do():
    _, error, _ = build(config(PAIR, [entry("pmf")]))
    assert "fusion layers run the last num_fusion_layers blocks of every tower" in str(error)
    assert "leave it out of 'modalities'" in str(error)
    # narrowed by hand to the towers with blocks, PMF fuses them and the CNN keeps its own head
    model, error, _ = build(config(TRIPLE, [entry("pmf", modalities=["text", "audio"])]))
    assert error is None, error
    model(batch_for(TRIPLE))["logits"].sum().backward()


def test_wander_per_layer_skips_the_cnn_among_three_towers():
    model, error, warned = build(config(TRIPLE, [entry("wander:layers")]))
    assert error is None, error
    assert len(warned) == 1 and "encoder 'image'" in warned[0]
    assert set(model.peft["wander"]["1"].up) == {"text", "audio"}
    model(batch_for(TRIPLE))["logits"].sum().backward()
    _, error, _ = build(config(TRIPLE, [entry("wander:layers", anchor="image")]))
    assert "encoder 'image' (timm_cnn)" in str(error) and "'anchor'" in str(error)
    _, error, _ = build(config(PAIR, [entry("wander:layers")]))
    assert "needs 2 towers with transformer blocks" in str(error) and "layers: null" in str(error)


def test_uniadapter_branches_naming_the_cnn_tower():
    _, error, _ = build(config(PAIR, [entry("uniadapter", branches={"image": "vision"})]))
    assert "encoder 'image' (timm_cnn)" in str(error) and "'branches'" in str(error)


def test_no_tower_with_blocks_left():
    _, error, _ = build(config({"image": CNN}, [entry("lora")]))
    assert "needs 1 tower with transformer blocks to act in, got 0" in str(error)
    assert "encoder 'image' (timm_cnn)" in str(error)


@pytest.mark.parametrize("encoders", [PAIR, TRIPLE, {"image": CNN}], ids=["pair", "triple", "cnn_only"])
def test_applicable_methods_agrees_with_attach(encoders):
    for case in cases():
        cfg = config(encoders, [entry(case)])
        name = case.split(":")[0]
        reason = applicable_methods(cfg)[name]
        _, error, _ = build(cfg)
        assert (reason is None) == (error is None), (case, reason, error)
        assert check_applicable(cfg) == ([] if reason is None else [f"{name}: not applicable: {reason}"])


@pytest.mark.parametrize("case", [c for c in cases() if block_use(c)])
def test_applicable_when_the_cnn_tower_is_named(case):
    method = METHODS.get(case.split(":")[0])
    narrowed = method.config_class(**{**METHOD_CASES.get(case, {}), "modalities": ["text", "image"]})
    ok, reason = method.applicable(tower_infos(config(PAIR, [])), narrowed)
    assert not ok and "encoder 'image' (timm_cnn) has no transformer blocks" in reason


def test_applicable_methods_without_building():
    infos = tower_infos(config(PAIR, []))
    assert infos["image"].num_layers == 0 and infos["text"].num_layers is None  # toy: unknown unbuilt
    assert tower_infos(config(PAIR, []), build=True)["text"].num_layers == TOY["text"]["config"]["depth"]
    table = applicable_methods(config(PAIR, []))
    assert set(table) == set(METHODS.names())
    assert table["pmf"].startswith("encoder 'image' (timm_cnn) has no transformer blocks")
    assert table["lora"] is None and table["late_fusion"] is None


def test_cli_inspect_and_list(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    run = {
        "model": config(PAIR, [{"name": "late_fusion"}]),
        "task": {"name": "classification"},
        "data": {"name": "avmnist", "root": str(tmp_path / "absent")},
    }
    path.write_text(yaml.safe_dump(run))
    assert cli_main(["inspect", "--config", str(path), "method=pmf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "pmf: not applicable: encoder 'image' (timm_cnn) has no transformer blocks"
    )
    assert cli_main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "needs blocks in every tower" in lines["pmf"]
    assert "acts in blocks" in lines["lora"] and "acts in blocks" not in lines["linear"]


@pytest.mark.parametrize("name", sorted(VIDEO_METHODS))
def test_video_methods_are_applicable_exactly_where_there_is_a_video_tower(name):
    from cases import BACKBONES

    without = config(PAIR, [{"name": name}])
    assert applicable_methods(without)[name] == "needs a video tower (type: video) among ['text', 'image']"
    assert f"{name}: needs a video tower" in str(build(without)[1])
    pytest.importorskip("timm")
    with_video = config(BACKBONES["video_pair"], [{"name": name, **METHOD_CASES[name]}])
    assert applicable_methods(with_video)[name] is None and build(with_video)[1] is None
