"""UniAdapter: closed-form sizes, sharing, insertion points, and the BLIP route on a tiny random BLIP."""

from __future__ import annotations

import warnings

import pytest
import torch

from cases import BACKBONES, model_config, toy_batch
from mmpeft import build_model, load_model_with_adapter, save_adapter
from mmpeft.methods.uniadapter import UniAdapterModule


def adapter_params(d: int, r: int, layers: int) -> int:
    """Closed form of the BLIP-route adapters (three branches), per layer index:
    LN_a (2d) + W_d (d·r + r) + W_v, W_t, W_m (3·(r·d + d)) + LN_m on the cross-modal output (2d).
    d=768: r=512 -> 1,578,752 per layer, 18,945,024 for 12; r=128 -> 398,720, 4,784,640 for 12."""
    return layers * (2 * d + (d * r + r) + 3 * (r * d + d) + 2 * d)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("r,expected", [(512, 18_945_024), (128, 4_784_640)])
def test_parameter_count_matches_released_and_paper_sizes(r, expected):
    assert adapter_params(768, r, 12) == expected
    modules = [UniAdapterModule(768, r, ["vision", "text"], cross_branch="text") for _ in range(12)]
    assert sum(n_params(m) for m in modules) == expected


def toy_model(backbone: str, **options):
    torch.manual_seed(0)
    return build_model(model_config(backbone, [{"name": "uniadapter", "r": 4, **options}]))


def test_unequal_widths_warn_and_fall_back_to_per_modality_modules():
    with pytest.warns(UserWarning, match="different width"):
        model = toy_model("pair")
    assert "shared" not in model.peft["uniadapter"]
    assert sorted(model.peft["uniadapter"]) == ["image", "text"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when sharing is off or possible
        toy_model("pair", share=False)
        toy_model("pair_equal")


def test_equal_widths_share_from_the_end():
    model = toy_model("pair_equal")  # text: 2 blocks, image: 3 blocks -> steps 1, 2 shared
    container = model.peft["uniadapter"]
    assert sorted(container["shared"]) == ["1", "2"] and sorted(container["image"]) == ["0"]
    assert sorted(k for k in container["shared"]["1"].up) == ["text_branch", "vision_branch"]


def randomize_up_projections(model) -> None:
    with torch.no_grad():  # zero up-projections would block every gradient to W_d
        for name, p in model.peft.named_parameters():
            if ".up." in name or ".cross_up." in name:
                p.normal_(0, 0.5)


def test_shared_down_projection_learns_from_each_modality():
    model = toy_model("pair_equal")
    randomize_up_projections(model)
    batch = toy_batch(BACKBONES["pair_equal"])
    down = model.peft["uniadapter"]["shared"]["2"].down.weight
    for m in ("image", "text"):
        model.zero_grad()
        states = model.backbone(batch)
        states[m].tokens.pow(2).mean().backward()  # a loss of one modality only
        assert down.grad is not None and down.grad.abs().sum() > 0, m


def test_official_init_reproduces_released_init():
    torch.manual_seed(0)
    m = UniAdapterModule(64, 32, ["vision", "text"], cross_branch="text", init="official")
    assert not m.up["text_branch"].weight.any() and not m.down.bias.any()
    for lin in (m.up["vision_branch"], m.cross_up):
        assert 0.015 < lin.weight.std() < 0.025 and not lin.bias.any()
    zero = UniAdapterModule(64, 32, ["vision", "text"], cross_branch="text")
    assert not any(lin.weight.any() for lin in (*zero.up.values(), zero.cross_up))


def test_bad_branch_map_names_the_modality():
    with pytest.raises(ValueError, match="audio"):
        toy_model("pair", branches={"audio": "vision"})


def test_generic_route_on_bert_and_vit_adds_after_the_output_layernorm():
    from mmpeft import ENCODERS

    if "hf_bert" not in ENCODERS or "hf_vit" not in ENCODERS:
        pytest.skip("the hf_bert / hf_vit encoders are not registered")
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    config = {
        "encoders": {
            "text": {"type": "hf_bert", "config": {"vocab_size": 50, "num_hidden_layers": 2, **small}},
            "image": {
                "type": "hf_vit",
                "config": {"image_size": 32, "patch_size": 16, "num_hidden_layers": 3, **small},
            },
        },
        "methods": [{"name": "uniadapter", "r": 8}],
        "head": {"num_outputs": 2},
    }
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert sorted(model.peft["uniadapter"]["shared"]) == ["1", "2"]  # aligned from the end
    randomize_up_projections(model)
    text = model.backbone.encoders["text"]
    state = text.run_block(0, text.embed({"input_ids": torch.randint(1, 50, (2, 6))}))
    seen = {}
    handle = text.linears(1)["fc1"].register_forward_pre_hook(lambda mod, args: seen.update(a=args[0]))
    with torch.no_grad():
        y = text.run_block(1, state).tokens
        with model.adapters_disabled():
            y0 = text.run_block(1, state).tokens  # LN(a + FFN(a))
        want = y0 + model.peft["uniadapter"]["shared"]["2"](seen["a"], "text")
    handle.remove()
    torch.testing.assert_close(y, want)


# --- the BLIP route ------------------------------------------------------------------------------
TINY_BLIP = {
    "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 16, "initializer_range": 0.02,
    },
    "text_config": {
        "vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64,
        "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0,
    },
    "image_text_hidden_size": 16,
}  # fmt: skip


def blip_config(**options) -> dict:
    tower = lambda t: {"type": "hf_blip", "config": TINY_BLIP, "options": {"tower": t}}
    return {
        "encoders": {"image": tower("vision"), "text": tower("text")},
        "methods": [{"name": "uniadapter", "r": 8, **options}],
        "head": {"num_outputs": 0},
    }


def blip_model(**options):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return build_model(blip_config(**options))


def blip_batch(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 99, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[-1, 5:] = 0
    return {
        "image": {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)},
        "text": {"input_ids": ids, "attention_mask": mask},
    }


def test_blip_towers_share_one_model_and_count_matches_closed_form():
    model = blip_model()
    image, text = model.backbone.encoders["image"], model.backbone.encoders["text"]
    assert image.blip is text.blip
    assert n_params(model.peft["uniadapter"]) == adapter_params(32, 8, 2)
    again = blip_model()  # a second build gets its own BLIP
    assert again.backbone.encoders["image"].blip is not image.blip


@pytest.mark.parametrize("r,expected", [(512, 18_945_024), (128, 4_784_640)])
def test_full_size_blip_base_counts(r, expected):
    pytest.importorskip("transformers")
    tower = lambda t: {"type": "hf_blip", "config": {}, "options": {"tower": t}}  # BLIP-base defaults
    config = {
        "encoders": {"image": tower("vision"), "text": tower("text")},
        "methods": [{"name": "uniadapter", "r": r}],
    }
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model({**config, "head": {"num_outputs": 0}})
    adapters = n_params(model.peft["uniadapter"])
    assert adapters == expected
    base = n_params(model.backbone.encoders["image"].blip)  # 223.7 M
    if r == 128:
        assert 0.020 < adapters / base < 0.023  # the paper's 2.2%


def test_blip_identity_at_init_and_parity_with_hf():
    from mmpeft.methods.uniadapter_blip import itm_logits

    model = blip_model().eval()
    batch = blip_batch()
    blip = model.backbone.encoders["image"].blip
    with torch.no_grad():
        states = model.backbone(batch)
        itm = itm_logits(model, states["image"].tokens, batch["text"])
        with model.adapters_disabled():
            frozen = model.backbone(batch)
            itm_frozen = itm_logits(model, frozen["image"].tokens, batch["text"])
        args = {"input_ids": batch["text"]["input_ids"], "pixel_values": batch["image"]["pixel_values"]}
        args["attention_mask"] = batch["text"]["attention_mask"]
        hf_itm, hf_itc = blip(**args).itm_score, blip(**args, use_itm_head=False).itm_score
        itc = model.peft["head"].itc_logits(states) / model.peft["head"](states)["logit_scale"]
        for m, enc in model.backbone.encoders.items():
            assert torch.equal(states[m].tokens, frozen[m].tokens), m
            torch.testing.assert_close(enc.reference_forward(batch[m]), frozen[m].tokens)
    assert torch.equal(itm, itm_frozen)
    torch.testing.assert_close(itm, hf_itm)
    torch.testing.assert_close(itc, hf_itc)  # cosine similarities of BLIP's ITC


def test_insertion_points_match_the_paper_equations():
    model = blip_model().eval()
    randomize_up_projections(model)
    batch = blip_batch()
    bb = model.backbone
    vis, txt = bb.encoders["image"], bb.encoders["text"]
    module = model.peft["uniadapter"]["shared"]["1"]
    seen = {}
    spy = lambda key: lambda mod, args, out: seen.__setitem__(key, (args[0], out))
    handles = [
        vis.norms(1)["ln_ffn"].register_forward_hook(spy("x'")),
        txt.norms(1)["ln_attn"].register_forward_hook(spy("a")),
        txt.norms(1)["ln_cross"].register_forward_hook(spy("c")),
    ]
    with torch.no_grad():
        states = bb.embed(batch)
        image = bb.run_block("image", 0, states["image"])
        text = bb.run_block("text", 0, states["text"])
        got = {"v": vis.run_block(1, image).tokens, "t": txt.run_block(1, text).tokens}
        x, a_text = seen["x'"][0], seen["a"][1]
        crossing = txt.with_image(text, vis.finalize(image).tokens)
        got["m"] = txt.run_block(1, crossing).tokens  # ITM mode
        a, c = seen["a"][1], seen["c"][1]
        assert not torch.equal(a, c)  # the query before cross-attention is not the FFN input
        with model.adapters_disabled():
            want_v = vis.run_block(1, image).tokens + module(x, "vision")  # x' + MLP(LN x') + A_v(x')
            want_t = txt.run_block(1, text).tokens + module(a_text, "text")  # LN(a + FFN a) + A_t(a)
            want_m = txt.run_block(1, crossing).tokens + module(a, "text") + module.cross(c)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got["v"], want_v)
    torch.testing.assert_close(got["m"], want_m)
    torch.testing.assert_close(got["t"], want_t)


def test_itc_itm_loss_reaches_all_three_branches():
    from mmpeft.methods.uniadapter_blip import blip_itc_itm_loss

    model = blip_model().train()
    out = blip_itc_itm_loss(
        model, blip_batch(4), ["a", "a", "b", "c"], generator=torch.Generator().manual_seed(0)
    )
    assert set(out) >= {"loss", "itc", "itm"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for step, module in model.peft["uniadapter"]["shared"].items():
        for name, lin in [*module.up.items(), ("cross", module.cross_up)]:
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0, (step, name)
    head = model.peft["head"]
    assert all(p.grad is not None for p in head.parameters())
    model.zero_grad(set_to_none=True)
    blip_itc_itm_loss(model, blip_batch(4), ["a", "a", "b", "c"], itm=False)["loss"].backward()
    assert model.peft["uniadapter"]["shared"]["0"].cross_up.weight.grad is None  # ITM is its only path


def test_rerank_orders_top_k_by_itm_score():
    from mmpeft.methods.uniadapter_blip import itm_match_scores, rerank_with_itm

    model = blip_model().eval()
    randomize_up_projections(model)
    batch = blip_batch(4)
    with torch.no_grad():
        images = model.backbone(batch)["image"].tokens[:3]  # 3 images, 4 texts
    texts = batch["text"]
    ii, tt = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    itm = itm_match_scores(model, images, texts, ii.reshape(-1), tt.reshape(-1)).view(3, 4)
    sims = -itm  # ITC ranks in the opposite order of ITM
    i2t, t2i = rerank_with_itm(model, sims, images, texts, k=3, chunk=5)
    for i in range(3):
        top = sims[i].topk(3).indices
        assert (i2t[i].sort(descending=True).indices[:3] == top[itm[i, top].argsort(descending=True)]).all()
        assert (i2t[i, [j for j in range(4) if j not in top]] == -100).all()
        torch.testing.assert_close(i2t[i, top], itm[i, top])
    assert not torch.equal(i2t.argmax(1), sims.argmax(1))
    torch.testing.assert_close(t2i, itm.t())  # k covers all 3 images: every text ranks them by ITM


def test_blip_adapter_round_trip(tmp_path):
    from mmpeft.methods.uniadapter_blip import itm_logits

    model = blip_model().eval()
    randomize_up_projections(model)
    save_adapter(model, str(tmp_path))
    torch.manual_seed(0)
    loaded = load_model_with_adapter(str(tmp_path)).eval()
    batch = blip_batch()
    with torch.no_grad():
        for m in (model, loaded):
            itm = itm_logits(m, m.backbone(batch)["image"].tokens, batch["text"])
            assert torch.equal(itm, itm_logits(model, model.backbone(batch)["image"].tokens, batch["text"]))
        a, b = model(batch)["logits"], loaded(batch)["logits"]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "text", "logit_scale"))
