"""Contract tests generated from the method registry over toy pairs and triples (CONVENTIONS: PEFT)."""

from __future__ import annotations

import pytest
import torch

from cases import BACKBONES, METHOD_CASES, VIDEO_METHODS, method_entry, model_config, toy_batch
from mmpeft import METHODS, build_model, load_model_with_adapter, save_adapter


def backbones_for(case: str) -> list[str]:
    if case.split(":")[0] in VIDEO_METHODS:
        return ["video_pair"]
    method = METHODS.get(case.split(":")[0])
    if method.needs_equal_width:
        return ["pair_equal"]
    return ["pair", "triple"]


CASES = [(c, b) for c in METHOD_CASES if c.split(":")[0] in METHODS for b in backbones_for(c)]


def build(case: str, backbone: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config(backbone, [method_entry(case)]))


def loss_of(model, batch) -> torch.Tensor:
    logits = model(batch)["logits"]
    target = torch.arange(logits.shape[0]) % logits.shape[1]
    return torch.nn.functional.cross_entropy(logits, target)


def test_every_method_has_a_case_and_docs():
    cases = {c.split(":")[0] for c in METHOD_CASES}
    missing = [m for m in METHODS.names() if m not in cases]
    assert not missing, f"add METHOD_CASES entries for {missing}"
    import pathlib

    docs = pathlib.Path(__file__).parents[1] / "docs" / "methods"
    undocumented = [m for m in METHODS.names() if not (docs / f"{m}.md").exists()]
    assert not undocumented, f"add docs/methods/<name>.md for {undocumented}"


@pytest.mark.parametrize("case,backbone", CASES)
def test_only_declared_parameters_change_and_all_learn(case, backbone):
    model = build(case, backbone)
    batch = toy_batch(BACKBONES[backbone])
    method = METHODS.get(case.split(":")[0])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a method must train something"
    if not method.trains_base_weights:
        outside = [n for n in trainable if not n.startswith("peft.")]
        assert not outside, f"trainable parameters outside model.peft: {outside[:5]}"
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    got_grad = dict.fromkeys(trainable, False)
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    model.train()
    for _ in range(3):  # zero-initialised factors (LoRA B, adapter up) make others' first gradient 0
        opt.zero_grad()
        loss_of(model, batch).backward()
        for n, p in trainable.items():
            got_grad[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    no_grad = [n for n, ok in got_grad.items() if not ok]
    assert not no_grad, f"parameters that never received gradient: {no_grad}"
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(trainable) - {n for n in trainable if n not in before}, (
        f"changed but not trainable: {sorted(changed - set(trainable))[:5]}; "
        f"trainable but unchanged: {sorted(set(trainable) - changed)[:5]}"
    )


@pytest.mark.parametrize(
    "case,backbone", [c for c in CASES if METHODS.get(c[0].split(":")[0]).identity_at_init]
)
def test_identity_at_init(case, backbone):
    model = build(case, backbone).eval()
    batch = toy_batch(BACKBONES[backbone])
    with torch.no_grad():
        states = model.backbone(batch)
        with model.adapters_disabled():
            frozen = model.backbone(batch)
        for m, enc in model.backbone.encoders.items():
            assert torch.equal(states[m].tokens, frozen[m].tokens), m
            assert torch.equal(enc.reference_forward(batch[m]), frozen[m].tokens), m


@pytest.mark.parametrize("case,backbone", CASES)
def test_save_load_round_trip(case, backbone, tmp_path):
    model = build(case, backbone)
    batch = toy_batch(BACKBONES[backbone])
    with torch.no_grad():  # move every trainable tensor away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    save_adapter(model, str(tmp_path))
    torch.manual_seed(0)  # the same random base weights (a real base loads from its path)
    loaded = load_model_with_adapter(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(model(batch)["logits"], loaded(batch)["logits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("case,backbone", CASES)
def test_encoder_state_dict_keys_unchanged(case, backbone):
    torch.manual_seed(0)
    plain = build_model(model_config(backbone, []))
    model = build(case, backbone)
    for m in plain.backbone.encoders:
        assert list(model.backbone.encoders[m].model.state_dict()) == list(
            plain.backbone.encoders[m].model.state_dict()
        )
