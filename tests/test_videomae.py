"""`hf_videomae`: block-wise run equals transformers' VideoMAEModel; clips collate through the
checkpoint's processor; block methods (PMF included: one sequence per clip) train on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft.model import build_model
from mmpeft.registry import ENCODERS

tf = pytest.importorskip("transformers")

TINY = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 32, "patch_size": 16, "num_frames": 4, "tubelet_size": 2,
}  # fmt: skip


def make(**config):
    torch.manual_seed(0)
    return ENCODERS.get("hf_videomae").from_config({**TINY, **config}, modality="video")


def run_all(enc, inputs):
    state = enc.embed(inputs)
    for i in range(enc.num_layers):
        state = enc.run_block(i, state)
    return enc.finalize(state)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_blockwise_run_equals_videomae_model(mean_pooling):
    enc = make(use_mean_pooling=mean_pooling)
    pixels = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        ours, ref = run_all(enc, {"pixel_values": pixels}), enc.reference_forward(pixels)
    assert ours.tokens.shape == (2, 2 * 2 * 2, 32)  # (4 / 2 tubelets) x 2 x 2 patches
    torch.testing.assert_close(ours.tokens, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.pool(ours), ref.mean(1), atol=1e-5, rtol=1e-5)
    assert set(enc.linears(0)) == {"q", "k", "v", "o", "fc1", "fc2"}
    assert enc.norms(1)["ln_ffn"] is enc.model.encoder.layer[1].layernorm_after


def test_wrong_shapes_and_padding_are_named():
    enc = make()
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 4, 3, 32, 32\)"):
        enc.embed(torch.randn(2, 3, 3, 32, 32))
    state = enc.embed(torch.randn(2, 4, 3, 32, 32))
    pad = torch.zeros(2, state.tokens.shape[1], dtype=torch.bool)
    pad[0, -1] = True
    with pytest.raises(ValueError, match="takes no mask"):
        enc.run_block(0, state.replace(pad_mask=pad))
    with pytest.raises(ValueError, match="item 1: expected a clip file"):
        enc.collate([np.zeros((4, 3, 32, 32), np.float32), np.zeros((5, 32, 32), np.uint8)])
    with pytest.raises(ValueError, match="image processor"):
        enc.collate([np.zeros((6, 40, 40, 3), np.uint8)])


def test_save_and_load_with_processor_collates_frames_and_clip_files(tmp_path):
    pytest.importorskip("av")
    from mmpeft.data.video import write_clip

    enc = make()
    enc.model.save_pretrained(tmp_path)
    tf.VideoMAEImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    loaded = ENCODERS.get("hf_videomae").from_pretrained(str(tmp_path), modality="video")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 48, 48, 3), dtype=np.uint8)
    clip = str(tmp_path / "clip.mp4")
    write_clip(clip, frames, fps=5)
    batch = loaded.collate([frames, clip])  # 10 frames -> 4 sampled uniformly
    assert batch.shape == (2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            run_all(loaded, batch).tokens, enc.reference_forward(batch), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("method", ["lora", "uniadapter", "pmf"])
def test_block_methods_train_on_videomae(method):
    options = {"lora": {"r": 2}, "uniadapter": {"r": 4}, "pmf": {"num_fusion_layers": 1, "mlp_hidden": 8}}
    config = {
        "encoders": {
            "video": {"type": "hf_videomae", "config": TINY},
            "text": {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2, "heads": 4}},
        },
        "methods": [{"name": method, **options[method]}],
        "head": {"num_outputs": 3},
    }
    torch.manual_seed(0)
    model = build_model(config)
    inputs = {"video": torch.randn(2, 4, 3, 32, 32), "text": torch.randn(2, 5, 8)}
    loss = model(inputs)["logits"].square().sum()
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
