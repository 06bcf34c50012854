"""Audio (Whisper, wav2vec2/HuBERT) and timm (ViT, CNN) encoder families on tiny random models.

Parity with each library's own forward, save/load round trips, canonical modules, LoRA through
``build_model`` next to a toy encoder, a 0-block CNN tower in the lockstep backbone, and collate.
Real weights (../shared) are exercised only by the slow tests, skipped when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # timm is needed only by the timm cases (see needs_timm)

from cases import TOY, toy_batch  # noqa: E402
from mmpeft import ENCODERS, build_model  # noqa: E402
from mmpeft.encoders.base import CANONICAL_LINEARS, CANONICAL_NORMS  # noqa: E402

B = 2
STABLE = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}
# case -> (registered type, config)
CASES = {
    "whisper": ("hf_whisper", {}),
    "wav2vec2_base": ("hf_wav2vec2", {}),
    "wav2vec2_large": ("hf_wav2vec2", STABLE),
    "hubert_base": ("hf_wav2vec2", {"model_type": "hubert"}),
    "hubert_large": ("hf_wav2vec2", {"model_type": "hubert", **STABLE}),
    "vit": ("timm_vit", {}),
    "vit_reg": ("timm_vit", {"reg_tokens": 2}),
    "vit_reg_avg": ("timm_vit", {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}),
    "cnn_effnet": ("timm_cnn", {}),
    "cnn_resnet": ("timm_cnn", {"model_name": "test_resnet"}),
}
BLOCK_CASES = [c for c in CASES if not c.startswith("cnn")]
ONE_PER_FAMILY = ["whisper", "wav2vec2_large", "hubert_base", "vit_reg", "cnn_effnet"]
WAVE_LENGTHS = [400, 230]  # samples; the second row is padded


def needs_timm(kind: str) -> None:
    """Skip a timm case where timm is absent, so the audio cases still run (the transformers floor CI)."""
    if kind.startswith("timm"):
        pytest.importorskip("timm")


def build(case: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    kind, config = CASES[case]
    needs_timm(kind)
    return ENCODERS.get(kind).from_config(dict(config), modality="m", **options)


def inputs_for(case: str, padded: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if case == "whisper":
        return torch.randn(B, 16, 32, generator=g)  # the tiny model's full 32 mel frames
    if case.startswith(("wav2vec2", "hubert")):
        if not padded:
            return torch.randn(B, 400, generator=g)
        waves = [torch.randn(n, generator=g).numpy() for n in WAVE_LENGTHS]
        return ENCODERS.get("hf_wav2vec2").from_config({}, modality="m").collate(waves)
    size = 32 if case.startswith("vit") else 64
    return torch.randn(B, 3, size, size, generator=g)


def run_all(enc, x):
    state = enc.embed(x)
    for i in range(enc.num_layers):
        state = enc.run_block(i, state)
    return enc.finalize(state)


# --- parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_library_forward(case):
    enc = build(case)
    x = inputs_for(case)
    with torch.no_grad():
        state = run_all(enc, x)
        ref = enc.reference_forward(x)
    assert state.tokens.shape == ref.shape and state.tokens.shape[-1] == enc.dim
    keep = state.valid_mask  # padded frames are not compared
    torch.testing.assert_close(state.tokens[keep], ref[keep], atol=1e-5, rtol=1e-5)
    if case.startswith(("wav2vec2", "hubert")):
        lengths = enc.model._get_feat_extract_output_lengths(torch.tensor(WAVE_LENGTHS))
        assert state.pad_mask is not None and (keep.sum(1) == lengths).all()
    if case.startswith(("vit", "cnn")):  # pooled features = timm's own head features
        with torch.no_grad():
            head = enc.model.forward_head(enc.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(enc.pool(state), head, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["wav2vec2_base", "hubert_large"])
def test_wav2vec2_unpadded_parity(case):
    enc = build(case)
    x = inputs_for(case, padded=False)
    with torch.no_grad():
        torch.testing.assert_close(run_all(enc, x).tokens, enc.reference_forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["whisper", "wav2vec2_large", "hubert_base"])
def test_audio_parity_with_eager_attention(case):
    enc = build(case, attn_implementation="eager")
    assert enc.model.config._attn_implementation == "eager"
    x = inputs_for(case)
    with torch.no_grad():
        state = run_all(enc, x)
        ref = enc.reference_forward(x)
    keep = state.valid_mask
    torch.testing.assert_close(state.tokens[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_wav2vec2_final_norm_placement():
    base, large = build("wav2vec2_base"), build("wav2vec2_large")
    assert not base.pre_norm and large.pre_norm
    x = inputs_for("wav2vec2_base", padded=False)
    with torch.no_grad():
        s = large.embed(x)
        assert torch.equal(large.finalize(s).tokens, large.model.encoder.layer_norm(s.tokens))
        assert torch.equal(base.finalize(base.embed(x)).tokens, base.embed(x).tokens)


def test_whisper_short_window():
    enc = build("whisper", window_seconds=0.1)  # 10 mel frames -> 5 tokens
    x = torch.randn(B, 16, 10)
    with torch.no_grad():
        state = run_all(enc, x)
        ref = enc.reference_forward(x)
    assert state.tokens.shape == (B, 5, enc.dim)
    torch.testing.assert_close(state.tokens, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="window_seconds"):
        build("whisper").embed(x)  # the standard mode takes exactly the full 32 frames
    with pytest.raises(ValueError, match="exceed"):
        enc.embed(torch.randn(B, 16, 40))


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_blocks_take_longer_sequences_and_honour_the_pad_mask(case):
    enc = build(case)
    x = inputs_for(case)
    with torch.no_grad():
        state = enc.embed(x)
        Bn, T, D = state.tokens.shape
        pad = state.pad_mask if state.pad_mask is not None else torch.zeros(Bn, T, dtype=torch.bool)
        # padded junk appended after the sequence must not change any real token
        junk = state.replace(
            tokens=torch.cat([state.tokens, 100 * torch.randn(Bn, 3, D)], 1),
            pad_mask=torch.cat([pad, torch.ones(Bn, 3, dtype=torch.bool)], 1),
        )
        keep = ~pad
        torch.testing.assert_close(
            enc.run_block(0, junk).tokens[:, :T][keep],
            enc.run_block(0, state).tokens[keep],
            atol=1e-5,
            rtol=1e-5,
        )
        # prompts inserted after the prefix (attendable): the blocks run and pooling drops them
        p = state.n_prefix
        prompts = torch.randn(Bn, 2, D)
        tokens = torch.cat([state.tokens[:, :p], prompts, state.tokens[:, p:]], 1)
        mask = torch.cat([pad[:, :p], torch.zeros(Bn, 2, dtype=torch.bool), pad[:, p:]], 1)
        out = state.replace(tokens=tokens, pad_mask=mask, n_prompt=2)
        for i in range(enc.num_layers):
            out = enc.run_block(i, out)
        out = enc.finalize(out)
    assert out.tokens.shape == (Bn, T + 2, D)
    assert enc.pool(out).shape == (Bn, enc.dim) and torch.isfinite(enc.pool(out)).all()


# --- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ONE_PER_FAMILY)
def test_save_load_roundtrip(case, tmp_path):
    enc = build(case)
    enc.save_pretrained(str(tmp_path))
    loaded = type(enc).from_pretrained(str(tmp_path), modality="m")
    assert loaded.source == str(tmp_path)
    x = inputs_for(case)
    with torch.no_grad():
        torch.testing.assert_close(run_all(loaded, x).tokens, run_all(enc, x).tokens, atol=0, rtol=0)


def test_whisper_loads_encoder_from_full_checkpoint(tmp_path):
    import transformers

    from mmpeft.encoders.hf_whisper import TINY_WHISPER

    torch.manual_seed(0)
    full = transformers.WhisperModel(
        transformers.WhisperConfig(**TINY_WHISPER, decoder_layers=1, decoder_attention_heads=2)
    )
    full.save_pretrained(str(tmp_path))
    enc = ENCODERS.get("hf_whisper").from_pretrained(str(tmp_path), modality="m")
    x = inputs_for("whisper")
    with torch.no_grad():
        torch.testing.assert_close(run_all(enc, x).tokens, full.encoder.eval()(x).last_hidden_state)
    # a checkpoint that lacks an encoder weight is an error, never a silent random init
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layers.0.fc1.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights"):
        ENCODERS.get("hf_whisper").from_pretrained(str(tmp_path), modality="m")


# --- modules and keys -------------------------------------------------------------------------
def plain_model(case: str):
    """The same model built by its library alone."""
    kind, config = CASES[case]
    enc = build(case)
    if kind.startswith("timm"):
        import timm

        from mmpeft.encoders.timm_cnn import TINY_CNN
        from mmpeft.encoders.timm_vit import TINY_VIT

        kwargs = (
            dict(config)
            if "model_name" in config
            else {**(TINY_VIT if kind == "timm_vit" else TINY_CNN), **config}
        )
        return timm.create_model(kwargs.pop("model_name"), **kwargs), enc
    return type(enc.model)(enc.model.config), enc


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_are_the_library_keys(case):
    plain, enc = plain_model(case)
    assert list(enc.model.state_dict()) == list(plain.state_dict())
    assert all(k.startswith("model.") for k in enc.state_dict())


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_linears_and_norms_are_real_submodules(case):
    enc = build(case)
    inside = {id(m) for m in enc.model.modules()}
    for i in range(enc.num_layers):
        block = {id(m) for m in enc.block(i).modules()}
        lin, norms = enc.linears(i), enc.norms(i)
        assert set(lin) <= set(CANONICAL_LINEARS) and set(norms) == {"ln_attn", "ln_ffn"} <= set(
            CANONICAL_NORMS
        )
        assert all(isinstance(m, torch.nn.Linear) and id(m) in block for m in lin.values())
        assert all(id(m) in block and id(m) in inside for m in norms.values())
        expected = (
            {"qkv", "o", "fc1", "fc2"} if case.startswith("vit") else {"q", "k", "v", "o", "fc1", "fc2"}
        )
        assert set(lin) == expected


@pytest.mark.parametrize("case", ["cnn_effnet", "cnn_resnet"])
def test_cnn_tower_has_no_blocks(case):
    enc = build(case)
    assert enc.num_layers == 0
    for call in (enc.block, enc.linears, enc.norms, lambda i: enc.run_block(i, None)):
        with pytest.raises(RuntimeError, match="no transformer blocks"):
            call(0)


# --- through build_model ----------------------------------------------------------------------
def model_with_toy(case: str, methods: list, seed: int = 0):
    kind, config = CASES[case]
    needs_timm(kind)
    torch.manual_seed(seed)
    spec = {"encoders": {"x": {"type": kind, "config": dict(config)}, "text": TOY["text"]}}
    model = build_model({**spec, "methods": methods, "head": {"num_outputs": 3}})
    batch = {"x": inputs_for(case), "text": toy_batch({"text": TOY["text"]}, batch_size=B)["text"]}
    return model, batch


@pytest.mark.parametrize("case", ONE_PER_FAMILY[:-1])
def test_lora_identity_at_init_and_gradients(case):
    model, batch = model_with_toy(case, [{"name": "lora", "r": 2, "targets": ["q", "v"]}])
    out = model(batch)["logits"]
    with torch.no_grad(), model.adapters_disabled():
        base = model(batch)["logits"]
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    out.square().sum().backward()
    deltas = model.peft["lora"]["x"]
    assert len(deltas) == model.backbone.encoders["x"].num_layers
    for per_layer in deltas.values():
        assert set(per_layer) == {"q", "v"}
        assert all(d.B.shape[0] == model.backbone.encoders["x"].dim for d in per_layer.values())  # qkv slice
        assert all(d.B.grad is not None and d.B.grad.abs().sum() > 0 for d in per_layer.values())
    assert all(p.grad is None for p in model.backbone.encoders["x"].parameters())


@pytest.mark.parametrize("methods", [[{"name": "linear"}], [{"name": "late_fusion", "proj_dim": 8}]])
def test_cnn_tower_next_to_toy_transformer(methods):
    model, batch = model_with_toy("cnn_effnet", methods)
    assert model.backbone.num_steps == TOY["text"]["config"]["depth"]
    assert model.backbone.layer_at("x", 0) is None
    out = model(batch)
    assert out["states"]["x"].tokens.shape[-1] == model.backbone.encoders["x"].dim
    out["logits"].sum().backward()
    trained = [p for p in model.peft.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_cnn_tower_with_block_methods():
    with pytest.warns(UserWarning, match="encoder 'x' has no transformer blocks"):
        model, batch = model_with_toy("cnn_effnet", [{"name": "lora", "r": 2}])  # acts on the toy only
    assert len(model.peft["lora"]["x"]) == 0 and len(model.peft["lora"]["text"]) == 2
    model(batch)["logits"].sum().backward()
    with pytest.raises(ValueError, match="no transformer blocks to act in; leave it out"):
        model_with_toy("cnn_effnet", [{"name": "lora", "r": 2, "modalities": ["x"], "layers": [-1]}])


# --- collate ------------------------------------------------------------------------------------
def test_whisper_collate():
    enc = build("whisper")
    rng = np.random.default_rng(0)
    batch = enc.collate(
        [rng.standard_normal(1600), rng.standard_normal(16000) * 0.1, rng.standard_normal((16, 20))]
    )
    assert batch["input_features"].shape == (3, 16, 32)
    assert torch.isfinite(run_all(enc, batch).tokens).all()
    assert (
        build("whisper", window_seconds=0.1).collate([rng.standard_normal(800)])["input_features"].shape[-1]
        == 10
    )
    with pytest.raises(ValueError, match="item 1"):
        enc.collate([rng.standard_normal(100), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="item 1 contains NaN"):
        enc.collate([rng.standard_normal((16, 20)), np.full(100, np.nan)])
    with pytest.raises(ValueError, match="item 0 contains NaN"):
        enc.collate([np.full(100, np.nan)])
    with pytest.raises(ValueError, match="resample"):
        build("whisper", sampling_rate=8000).collate([rng.standard_normal(100)])


def test_wav2vec2_collate():
    enc = build("hubert_base")
    rng = np.random.default_rng(0)
    batch = enc.collate([rng.standard_normal(300), rng.standard_normal(500)])
    assert batch["input_values"].shape == (2, 500)
    assert batch["attention_mask"].sum(1).tolist() == [300, 500]
    assert run_all(enc, batch).pad_mask[0].any()
    with pytest.raises(ValueError, match="item 1 has 5 samples"):
        enc.collate([rng.standard_normal(300), rng.standard_normal(5)])
    with pytest.raises(ValueError, match="item 0 has shape"):
        enc.collate([rng.standard_normal((2, 300))])


@pytest.mark.parametrize("case", ["vit_reg", "cnn_resnet"])
def test_image_collate(case, tmp_path):
    from PIL import Image

    enc = build(case)
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(path)
    items = [Image.open(path), str(path), rng.random((50, 60, 3)), rng.random((3, 20, 20))]
    x = enc.collate(items)
    size = enc.model.pretrained_cfg["input_size"][1] if case.startswith("cnn") else 32
    assert x.shape == (4, 3, size, size)
    assert torch.isfinite(run_all(enc, x).tokens).all()
    with pytest.raises(ValueError, match="item 1"):
        enc.collate([str(path), str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="item 0"):
        enc.collate([rng.random((5, 4, 3, 2))])


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="window_seconds"):
        build("whisper", window_second=2.0)
    with pytest.raises(ValueError, match="model_type"):
        ENCODERS.get("hf_wav2vec2").from_config({"model_type": "wavlm"}, modality="m")
    needs_timm("timm_vit")
    with pytest.raises(ValueError, match="unknown timm model"):
        ENCODERS.get("timm_vit").from_config({"model_name": "vit_nonexistent"}, modality="m")
    with pytest.raises(ValueError, match="pixel_values"):
        build("vit").embed(torch.randn(3, 32, 32))


# --- real weights (slow) ------------------------------------------------------------------------
def shared_dir() -> Path | None:
    for root in (os.environ.get("MMPEFT_SHARED"), Path(__file__).resolve().parents[2] / "shared"):
        if root and (Path(root) / "weights").is_dir():
            return Path(root)
    return None


SHARED = shared_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared (real weights and data) is absent")


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("window", [None, 2.0])
def test_real_whisper_tiny_en(window):
    signal = pytest.importorskip("scipy.signal")
    from scipy.io import wavfile

    path = SHARED / "weights" / "whisper_tiny_en_encoder"
    enc = ENCODERS.get("hf_whisper").from_pretrained(str(path), modality="audio", window_seconds=window)
    rate, wav = wavfile.read(SHARED / "data" / "fsdd" / "recordings" / "7_theo_0.wav")
    assert rate == 8000
    wav16 = signal.resample_poly(wav.astype(np.float32) / 32768.0, 2, 1)  # 8 -> 16 kHz, in the "reader"
    batch = enc.collate([wav16])
    assert batch["input_features"].shape == (1, 80, 3000 if window is None else 200)
    with torch.no_grad():
        state = run_all(enc, batch)
        ref = enc.reference_forward(batch)
    assert state.tokens.shape == (1, 1500 if window is None else 100, 384)
    torch.testing.assert_close(state.tokens, ref, atol=1e-4, rtol=1e-5)
    assert state.tokens.abs().max() > 1.0  # trained weights, not a random init


@pytest.mark.slow
@needs_shared
def test_real_efficientnet_lite0():
    needs_timm("timm_cnn")
    path = SHARED / "weights" / "efficientnet_lite0"
    enc = ENCODERS.get("timm_cnn").from_pretrained(str(path), modality="image")
    assert type(enc.model).__name__ == "EfficientNet" and enc.dim == 1280
    image = sorted((SHARED / "data" / "flickr8k_1k" / "images").glob("*.jpg"))[0]
    x = enc.collate([str(image)])
    normalize = enc._transform.transforms[-1]
    assert torch.allclose(torch.as_tensor(normalize.mean), torch.full((3,), 0.5))  # not ImageNet stats
    with torch.no_grad():
        state = run_all(enc, x)
        torch.testing.assert_close(state.tokens, enc.reference_forward(x), atol=1e-5, rtol=1e-5)
        logits = enc.model.forward_head(enc.model.forward_features(x))
    assert state.tokens.shape == (1, 49, 1280)
    assert logits.softmax(-1).max() > 0.05  # a trained classifier is confident on a real photo


@pytest.mark.parametrize("case", ["vit_reg", "cnn_effnet", "cnn_resnet"])
def test_max_tokens_is_the_token_count_of_a_collated_image(case):
    enc = build(case)
    size = enc.model.pretrained_cfg.get("input_size", (3, 32, 32))
    batch = enc.collate([np.random.rand(*size).astype(np.float32)])
    assert enc.embed(batch).tokens.shape[1] == enc.max_tokens


def test_gem_pooling_of_a_cnn_grid_is_the_generalised_mean():
    needs_timm("timm_cnn")
    from mmpeft.encoders.base import EncoderState

    enc = ENCODERS.get("timm_cnn").from_config({}, modality="image", pooling="gem")
    grid = torch.rand(2, 9, enc.dim) - 0.2  # some negative activations: clamped to ~0
    expected = grid.clamp_min(1e-6).pow(3).mean(1).pow(1 / 3)
    torch.testing.assert_close(enc.pool(EncoderState(grid)), expected)
    assert (
        enc.pool(EncoderState(grid))
        >= ENCODERS.get("timm_cnn").from_config({}, modality="image").pool(EncoderState(grid.clamp_min(0)))
    ).all()  # fmt: skip  (a power mean is at least the mean)
    with pytest.raises(ValueError, match="pooling 'gem' is for CNN feature grids"):
        ENCODERS.get("timm_vit").from_config({}, modality="image", pooling="gem")


def test_flip_average_is_the_mean_of_the_grid_and_the_mirror_images_grid_flipped_back():
    needs_timm("timm_cnn")
    plain = ENCODERS.get("timm_cnn").from_config({}, modality="image")
    flipped = ENCODERS.get("timm_cnn").from_config({}, modality="image", flip_average=True)
    flipped.model.load_state_dict(plain.model.state_dict())
    pixels = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        a, b = plain.model.forward_features(pixels), plain.model.forward_features(pixels.flip(-1))
        expected = ((a + b.flip(-1)) / 2).flatten(2).transpose(1, 2)
        got = flipped.embed(pixels).tokens
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain.embed(pixels).tokens)
    with pytest.raises(ValueError, match="flip_average is for CNN feature grids"):
        ENCODERS.get("timm_vit").from_config({}, modality="image", flip_average=True)
