"""PMF: parameter count at full size, the frozen prefix, prompts, N modalities, the query-stage tail."""

from __future__ import annotations

import pytest
import torch

from cases import BACKBONES, model_config, toy_batch
from mmpeft import ENCODERS, build_model
from mmpeft.adapter_io import adapter_state_dict
from mmpeft.encoders.base import EncoderState

HAS_HF = "hf_bert" in ENCODERS and "hf_vit" in ENCODERS
needs_hf = pytest.mark.skipif(not HAS_HF, reason="the hf_bert / hf_vit encoders are not registered")

VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
VIT_B16 |= {"image_size": 224, "patch_size": 16}
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
BERT_BASE |= {"intermediate_size": 3072, "max_position_embeddings": 512}
TINY_HF = {
    "text": {"type": "hf_bert", "config": {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 3,
                                           "num_attention_heads": 4, "intermediate_size": 40,
                                           "max_position_embeddings": 16}},
    "image": {"type": "hf_vit", "config": {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                                           "intermediate_size": 30, "image_size": 16, "patch_size": 8}},
}  # fmt: skip


def pmf_model(backbone="pair", encoders=None, num_outputs=3, **options):
    torch.manual_seed(0)
    cfg = model_config(backbone, [{"name": "pmf", **options}], num_outputs)
    if encoders is not None:
        cfg["encoders"] = encoders
    return build_model(cfg)


def tiny_hf_batch(batch_size=3):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch_size, 7, dtype=torch.long)
    mask[1:, 5:] = 0
    return {
        "text": {"input_ids": torch.randint(0, 50, (batch_size, 7), generator=g), "attention_mask": mask},
        "image": torch.randn(batch_size, 3, 16, 16, generator=g),
    }


@needs_hf
def test_trainable_parameters_of_vit_b16_and_bert_base():
    """ViT-B/16 + BERT-base, K = 2, prompts 4/4/4, h = 768 / 2 = 384, 101 classes:

    per fusion layer: QP + QCP, 2 ordered pairs x (4 + 4) x 768            =    12,288
                      mapping MLPs, 2 x (768*384 + 384 + 384*768 + 768)     = 1,181,952
                      FCPs, 2 modalities x 4 x 768                           =     6,144
    two fusion layers: 2 x 1,200,384                                         = 2,400,768
    heads: 2 x (768 * 101 + 101)                                             =   155,338
    total                                                                    = 2,556,106
    (the released code trains 12,288 fewer: its FCPs stay frozen by a naming bug, train_fcp=False).
    """
    encoders = {
        "image": {"type": "hf_vit", "config": VIT_B16},
        "text": {"type": "hf_bert", "config": BERT_BASE},
    }
    counts = {}
    for train_fcp in (True, False):
        with torch.device("meta"):  # shapes only: no memory, no random init of 200 M weights
            model = pmf_model(encoders=encoders, num_outputs=101, train_fcp=train_fcp)
        counts[train_fcp] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts == {True: 2_556_106, False: 2_556_106 - 12_288}


def record_grad_mode(model):
    seen = {}
    for m, enc in model.backbone.encoders.items():
        for i in range(enc.num_layers):

            def hook(mod, args, out, key=(m, i)):
                seen[key] = torch.is_grad_enabled()

            enc.block(i).register_forward_hook(hook)
    return seen


def test_no_autograd_before_the_first_fusion_layer_and_fcps_learn():
    model = pmf_model("triple")  # depths 2, 3, 4 -> 4 steps; fusion at steps 2 and 3
    first = model.backbone.first_trainable_step()
    assert first == 2
    seen = record_grad_mode(model)
    model(toy_batch(BACKBONES["triple"]))["logits"].square().mean().backward()
    early = {k for k in seen if model.backbone.step_of(*k) < first}
    assert early == {("audio", 0), ("audio", 1), ("image", 0)}
    assert not any(seen[k] for k in early)
    assert all(seen[k] for k in seen if k not in early)
    for layer in model.peft["pmf"].layers:
        for m in ("text", "image", "audio"):
            fcp = getattr(layer.fcp, m)
            assert fcp.requires_grad and fcp.grad is not None and fcp.grad.abs().sum() > 0


def test_train_fcp_false_freezes_the_fcps_but_saves_them():
    model = pmf_model(train_fcp=False)
    fcp = model.peft["pmf"].layers[0].fcp.text
    assert not fcp.requires_grad
    before = fcp.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(toy_batch(BACKBONES["pair"]))["logits"].square().mean().backward()
        opt.step()
    assert torch.equal(fcp, before)
    assert "peft.pmf.layers.0.fcp.text" in adapter_state_dict(model)  # the frozen random prompts travel


def test_three_modalities_of_different_widths_and_depths():
    model = pmf_model("triple", num_qp=2, num_qcp=1, num_fcp=3, head="concat")
    out = model(toy_batch(BACKBONES["triple"]))
    assert out["logits"].shape == (3, 3)
    layer = model.peft["pmf"].layers[0]
    assert {(a, b) for a in layer.pairs for b in layer.pairs[a]} == {
        (a, b) for a in ("text", "image", "audio") for b in ("text", "image", "audio") if a != b
    }
    assert layer.pairs["audio"]["image"].mlp[0].in_features == 24
    assert layer.pairs["audio"]["image"].mlp[2].out_features == 48
    assert layer.pairs["audio"]["image"].mlp[0].out_features == 24  # h = max width / 2
    for m, s in out["states"].items():  # prompts are gone after every fusion layer
        assert s.tokens.shape[1] == toy_batch(BACKBONES["triple"])[m]["values"].shape[1] + (m != "audio")
    with pytest.raises(ValueError, match="encoder 'text' has 2 blocks, fewer than num_fusion_layers=3"):
        pmf_model("triple", num_fusion_layers=3)


def with_tokens(state: EncoderState, extra: torch.Tensor) -> EncoderState:
    pad = state.pad_mask
    if pad is not None:
        pad = torch.cat([pad, torch.zeros(extra.shape[:2], dtype=torch.bool)], dim=1)
    return state.replace(tokens=torch.cat([state.tokens, extra], dim=1), pad_mask=pad)


def reference_logits(model, batch):
    """Two modalities written out as the paper's algorithm, with full frozen blocks everywhere."""
    enc, pmf = model.backbone.encoders, model.peft["pmf"]
    heads = getattr(model.peft["head"], "heads", None)
    K, (a, b) = len(pmf.layers), list(enc)
    x = {m: enc[m].embed(batch[m]) for m in enc}
    for m in enc:  # unimodal base feature extraction
        for i in range(enc[m].num_layers - K):
            x[m] = enc[m].run_block(i, x[m])
    for j, layer in enumerate(pmf.layers):
        index = {m: enc[m].num_layers - K + j for m in enc}
        queries = {}
        for src, dst in ((a, b), (b, a)):  # query stage
            pair = layer.pairs[src][dst]
            B = x[src].tokens.shape[0]
            prompts = pair.qp if pair.qcp is None else torch.cat([pair.qcp, pair.qp])
            prompts = prompts.expand(B, -1, -1)
            z = enc[src].run_block(index[src], with_tokens(x[src], prompts)).tokens
            queries[dst] = pair.mlp(z[:, -pair.qp.shape[0] :])
        new = {}
        for m in (a, b):  # fusion stage
            B, T = x[m].tokens.shape[:2]
            fcp = [getattr(layer.fcp, m).expand(B, -1, -1)] if hasattr(layer.fcp, m) else []
            extra = torch.cat([*fcp, queries[m]], dim=1)
            y = enc[m].run_block(index[m], with_tokens(x[m], extra))
            tokens = y.tokens[:, :T]
            if layer.gates is not None:  # prompt_gate: X + g (X_prompted - X)
                plain = enc[m].run_block(index[m], x[m]).tokens
                tokens = plain + layer.gates[m] * (tokens - plain)
            new[m] = y.replace(tokens=tokens, pad_mask=x[m].pad_mask)
        x = new
    pooled = [enc[m].pool(enc[m].finalize(x[m])) for m in (a, b)]
    head = model.peft["head"]
    if head.mode == "concat":
        return pooled[0] @ head.head.net[-1].weight[:, : pooled[0].shape[1]].T + (
            pooled[1] @ head.head.net[-1].weight[:, pooled[0].shape[1] :].T + head.head.net[-1].bias
        )
    logits = [heads[m](pooled[i]) for i, m in enumerate((a, b))]
    return (logits[0] + logits[1]) / 2


@pytest.mark.parametrize("kind", ["toy", "toy-no-context-concat", pytest.param("hf", marks=needs_hf)])
def test_matches_the_algorithm_written_out(kind):
    if kind == "toy":
        model, batch = pmf_model(num_qp=3, num_qcp=2, num_fcp=2), toy_batch(BACKBONES["pair"])
    elif kind == "toy-no-context-concat":  # no query-context or fusion-context prompts, one head
        model = pmf_model(num_qp=3, num_qcp=0, num_fcp=0, head="concat")
        batch = toy_batch(BACKBONES["pair"])
    else:
        model, batch = pmf_model(encoders=TINY_HF, num_qp=3, num_qcp=2, num_fcp=2), tiny_hf_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], reference_logits(model, batch))


def test_prompt_gate_starts_at_the_frozen_model_and_then_blends_as_written_out():
    model, batch = pmf_model(prompt_gate=True, head="concat"), toy_batch(BACKBONES["pair"])
    model.eval()
    logits = model(batch)["logits"]
    with torch.no_grad(), model.adapters_disabled():  # the frozen towers under the same head
        states = model.backbone(batch)
        frozen = model.peft["head"](states, model.backbone)
    torch.testing.assert_close(logits, frozen)
    logits.square().mean().backward()
    layer = model.peft["pmf"].layers[0]
    assert all(g.grad is not None and g.grad.abs() > 0 for g in layer.gates.values())
    assert layer.pairs["text"]["image"].qp.grad.abs().sum() == 0  # no signal through a closed gate
    with torch.no_grad():
        for j, layer in enumerate(model.peft["pmf"].layers):
            for k, g in enumerate(layer.gates.values()):
                g.fill_(0.3 + 0.2 * j - 0.5 * k)
        torch.testing.assert_close(model(batch)["logits"], reference_logits(model, batch))
        assert not torch.allclose(model(batch)["logits"], frozen)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in pmf_model(head="concat").parameters() if p.requires_grad) + 4


def tail_cases():
    yield "toy", pmf_model(), toy_batch(BACKBONES["pair"])
    if HAS_HF:
        yield "hf", pmf_model(encoders=TINY_HF), tiny_hf_batch()


@pytest.mark.parametrize("kind", ["toy", pytest.param("hf", marks=needs_hf)])
def test_run_block_tail_equals_the_full_block_sliced(kind):
    model, batch = next((m, b) for k, m, b in tail_cases() if k == kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m, enc in model.backbone.encoders.items():
            state = enc.embed(batch[m])
            extra = torch.randn(state.tokens.shape[0], 5, enc.dim, generator=g)
            state = with_tokens(state, extra)  # a padded sequence with prompts appended
            for i in range(enc.num_layers):
                full = enc.run_block(i, state).tokens[:, -3:]
                torch.testing.assert_close(enc.run_block_tail(i, state, 3), full)


def test_layers_option_is_refused_and_other_modalities_run_plainly():
    with pytest.raises(ValueError, match="do not set layers"):
        pmf_model(layers=[-1])
    model = pmf_model("triple", modalities=["text", "image"]).eval()
    batch = toy_batch(BACKBONES["triple"])
    with torch.no_grad():
        states = model.backbone(batch)
        with model.adapters_disabled():
            frozen = model.backbone(batch)
    assert torch.equal(states["audio"].tokens, frozen["audio"].tokens)  # not fused: its blocks ran as usual
    assert not torch.allclose(states["text"].tokens, frozen["text"].tokens)
    assert sorted(model.peft["head"].heads) == ["audio", "image", "text"]


def test_preset_validates():
    from mmpeft.run_config import config_folder, read_yaml, validate_run_config

    run = validate_run_config(read_yaml(str(config_folder().joinpath("pmf-base.yaml"))))
    (method,) = run.config["model"]["methods"]
    assert (method["num_fusion_layers"], method["num_qp"], method["num_qcp"], method["num_fcp"]) == (
        2,
        4,
        4,
        4,
    )
    assert run.config["model"]["head"]["num_outputs"] == 101


def test_prompts_start_normal_with_the_configured_std_and_absent_ones_are_absent():
    from mmpeft.methods.pmf import FusionLayer

    torch.manual_seed(0)
    layer = FusionLayer({"a": 256, "b": 128}, 8, num_qp=64, num_qcp=64, num_fcp=64, std=0.05, train_fcp=True)
    for t in (layer.pairs["a"]["b"].qp, layer.pairs["b"]["a"].qcp, layer.fcp.a, layer.fcp.b):
        assert t.std().item() == pytest.approx(0.05, rel=0.1) and abs(t.mean().item()) < 0.01
    bare = FusionLayer({"a": 4, "b": 4}, 8, num_qp=2, num_qcp=0, num_fcp=0, std=0.05, train_fcp=True)
    assert bare.pairs["a"]["b"].qcp is None and not hasattr(bare.fcp, "a")


def test_head_options_reach_the_pmf_heads():
    from mmpeft.methods.pmf import PMFHead

    default = PMFHead({"a": 4}, 3, "average")
    assert len(default.heads["a"].net) == 2 and default.heads["a"].net[0].p == 0.0  # dropout, linear
    for mode in ("average", "concat"):
        torch.manual_seed(0)
        cfg = model_config("pair", [{"name": "pmf", "head": mode}])
        cfg["head"] = {"num_outputs": 3, "hidden": 8, "dropout": 0.1}
        head = build_model(cfg).peft["head"]
        nets = [h.net for h in head.heads.values()] if mode == "average" else [head.head.net]
        assert all(len(n) == 4 and n[0].p == 0.1 and n[1].out_features == 8 for n in nets)
    assert isinstance(pmf_model(num_outputs=1).peft["head"], PMFHead)  # a single regression output
    assert "head" not in pmf_model(num_outputs=0).peft  # features only


@pytest.mark.parametrize("bad", [{"num_fusion_layers": 0}, {"num_qp": 0}, {"num_qcp": -1}, {"num_fcp": -1}])
def test_prompt_counts_are_checked(bad):
    with pytest.raises(
        ValueError, match="pmf: num_fusion_layers and num_qp must be >= 1, num_qcp and num_fcp >= 0"
    ):
        pmf_model(**bad)
    pmf_model(num_fusion_layers=1, num_qp=1, num_qcp=0, num_fcp=0)


def reference_logits_lacking(model, batch, lacking: str, rows: torch.Tensor):
    """``reference_logits`` for a batch whose ``rows`` lack modality ``lacking`` (model.missing=zeros):
    its tokens are zero from the first fusion layer on, the other tower does not attend the queries
    it sends, its final sequence is zero, and the average head averages the present modality only."""
    enc, pmf = model.backbone.encoders, model.peft["pmf"]
    K, (a, b) = len(pmf.layers), list(enc)
    x = {m: enc[m].embed(batch[m]) for m in enc}
    for m in enc:
        for i in range(enc[m].num_layers - K):
            x[m] = enc[m].run_block(i, x[m])
    keep = (~rows).view(-1, 1, 1).to(x[lacking].tokens.dtype)
    x[lacking] = x[lacking].replace(tokens=x[lacking].tokens * keep)
    for j, layer in enumerate(pmf.layers):
        index = {m: enc[m].num_layers - K + j for m in enc}
        queries = {}
        for src, dst in ((a, b), (b, a)):
            pair = layer.pairs[src][dst]
            B = x[src].tokens.shape[0]
            prompts = torch.cat([pair.qcp, pair.qp]).expand(B, -1, -1)
            z = enc[src].run_block(index[src], with_tokens(x[src], prompts)).tokens
            queries[dst] = pair.mlp(z[:, -pair.qp.shape[0] :])
        new = {}
        for m in (a, b):
            B, T = x[m].tokens.shape[:2]
            fcp = getattr(layer.fcp, m).expand(B, -1, -1)
            full = enc[m].run_block(index[m], with_tokens(x[m], torch.cat([fcp, queries[m]], dim=1)))
            alone = enc[m].run_block(index[m], with_tokens(x[m], fcp))  # the queries left out
            skip = rows.view(-1, 1, 1) if m != lacking else torch.zeros_like(rows).view(-1, 1, 1)
            new[m] = x[m].replace(tokens=torch.where(skip, alone.tokens[:, :T], full.tokens[:, :T]))
        x = new
    pooled = {m: enc[m].pool(enc[m].finalize(x[m])) for m in (a, b)}
    pooled[lacking] = pooled[lacking] * keep[:, 0]
    heads = model.peft["head"].heads
    both = (heads[a](pooled[a]) + heads[b](pooled[b])) / 2
    other = a if lacking == b else b
    return torch.where(rows.view(-1, 1), heads[other](pooled[other]), both)


@pytest.mark.parametrize("lacking", ["text", "image"])
def test_an_absent_modality_is_masked_as_written_out(lacking):
    model, batch = pmf_model(num_qp=3, num_qcp=2, num_fcp=2), toy_batch(BACKBONES["pair"], batch_size=4)
    rows = torch.tensor([False, True, False, True])
    model.eval()
    with torch.no_grad():
        got = model(batch, absent={lacking: rows})["logits"]
        torch.testing.assert_close(got, reference_logits_lacking(model, batch, lacking, rows))
