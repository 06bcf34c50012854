"""UniAdapter's video route on BLIP: frames through BLIP's vision tower, the mean-[CLS] video feature,
frame-aware attention in ITM (checked against a cross-attention written out here), the preset's count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpeft.model import build_model
from mmpeft.run_config import load_run_config
from test_uniadapter import TINY_BLIP, n_params

pytest.importorskip("transformers")

FRAMES = 3


def video_config(frame_aware: bool = True, frames: int = FRAMES) -> dict:
    video = {
        "type": "video",
        "config": TINY_BLIP,
        "options": {"image_type": "hf_blip", "frames": frames, "image_options": {"tower": "vision"}},
    }
    text = {"type": "hf_blip", "config": TINY_BLIP, "options": {"tower": "text"}}
    return {
        "encoders": {"video": video, "text": text},
        "methods": [{"name": "uniadapter", "r": 8, "frame_aware": frame_aware}],
        "head": {"num_outputs": 0},
    }


def video_model(**options):
    """The tiny video BLIP, its cross-attention sharpened: at the random init's scale (0.02) every
    score is ~0, and scaling keys would change nothing measurable."""
    torch.manual_seed(0)
    model = build_model(video_config(**options))
    encoder = model.backbone.encoders["text"]
    with torch.no_grad():
        for i in range(encoder.num_layers):
            attn = encoder.block(i).crossattention.self
            attn.query.weight.mul_(30.0)
            attn.key.weight.mul_(30.0)
    return model


def video_batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[-1, 4:] = 0
    return {
        "video": {"pixel_values": torch.randn(n * FRAMES, 3, 32, 32, generator=g)},
        "text": {"input_ids": torch.randint(4, 99, (n, 6), generator=g), "attention_mask": mask},
    }


def test_frame_key_scale_written_out():
    from mmpeft.methods.uniadapter_blip import frame_key_scale

    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(2, 5, generator=g), dim=-1)
    frames = F.normalize(torch.randn(2, 3, 5, generator=g), dim=-1)
    got = frame_key_scale(text, frames, tokens_per_frame=4)  # (2, 3 * 4)
    for p in range(2):
        sims = [float(text[p] @ frames[p, n]) for n in range(3)]
        z = sum(math.exp(s / 4) for s in sims)
        for n in range(3):
            weight = 3 * math.exp(sims[n] / 4) / z
            assert got[p, n * 4] == 1.0  # the frame's [CLS] key is not scaled
            for t in range(1, 4):
                assert got[p, n * 4 + t].item() == pytest.approx(weight, rel=1e-5)
    assert got.view(2, 3, 4)[:, :, 1].sum(1).tolist() == pytest.approx([3.0, 3.0])  # mean weight 1


def test_video_itc_feature_is_the_projection_of_the_mean_frame_cls():
    model = video_model().eval()
    with torch.no_grad():
        out = model(video_batch())
        tokens = out["states"]["video"].tokens  # (B, N·T, D)
    head = model.peft["head"]
    assert head.frames == FRAMES
    cls = tokens.view(4, FRAMES, -1, tokens.shape[-1])[:, :, 0]  # (B, N, D)
    expected = F.normalize(head.vision_proj(cls.mean(1)), dim=-1)
    torch.testing.assert_close(out["logits"]["video"], expected)


def cross_attention_by_hand(attn, query_states, image, key_scale, image_bias):
    """BLIP's text cross-attention (BlipTextSelfAttention) written out, keys scaled per image token."""
    B, T, D = query_states.shape
    H = attn.num_attention_heads
    d = D // H

    def heads(x):  # (B, L, D) -> (B, H, L, d)
        return x.view(B, -1, H, d).transpose(1, 2)

    q = heads(attn.query(query_states))
    k = heads(attn.key(image) * key_scale[:, :, None])
    v = heads(attn.value(image))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + image_bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


def test_frame_aware_attention_equals_a_cross_attention_written_out():
    from mmpeft.methods.uniadapter_blip import run_itm

    model = video_model().eval()
    batch = video_batch()
    head = model.peft["head"]
    with torch.no_grad():
        out = model(batch)
        image = out["states"]["video"].tokens  # (B, N·T, D)
        scale = head.key_scale(out["logits"]["text"], image)  # (B, N·T)
    assert scale is not None and not torch.allclose(scale, torch.ones_like(scale))
    encoder = model.backbone.encoders["text"]
    captured = []
    for i in range(encoder.num_layers):
        attn = encoder.block(i).crossattention.self

        def grab(module, args, kwargs, output):
            captured.append((module, args[0], output[0]))

        attn.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        itm = run_itm(model.backbone, head, image, batch["text"], key_scale=scale)
        plain = run_itm(model.backbone, head, image, batch["text"])
    assert len(captured) == 2 * encoder.num_layers  # two ITM passes
    zero_bias = torch.zeros(1, 1, 1, image.shape[1])
    for module, query_states, output in captured[: encoder.num_layers]:
        want = cross_attention_by_hand(module, query_states, image, scale, zero_bias)
        torch.testing.assert_close(output, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(itm, plain)
    # the hook is gone after each block: a plain pass afterwards equals the first plain pass
    with torch.no_grad():
        torch.testing.assert_close(run_itm(model.backbone, head, image, batch["text"]), plain)


def test_training_forward_uses_frame_aware_attention_only_when_on():
    torch.manual_seed(0)
    batch = video_batch()
    logits = {}
    for aware in (True, False):
        model = video_model(frame_aware=aware)
        head = model.peft["head"]
        head.itm = True
        torch.manual_seed(1)  # the same hard negatives
        out = model(batch, ids=["a", "b", "c", "d"])
        logits[aware] = out["logits"]["itm_logits"]
        out["logits"]["itm_logits"].sum().backward()  # gradients flow with the scaled keys
        assert head.itm_head.weight.grad is not None
    assert logits[True].shape == (12, 2)
    assert not torch.allclose(logits[True], logits[False])


def test_rerank_of_a_video_head_passes_the_text_embeddings():
    model = video_model().eval()
    batch = video_batch()
    head = model.peft["head"]
    with torch.no_grad():
        out = model(batch)
        image, text = out["logits"]["video"], out["logits"]["text"]
        sims = image @ text.T
        tokens = out["states"]["video"].tokens
        aware = head.rerank(model.backbone, sims, tokens, batch["text"], k=2, text_emb=text)
        blind = head.rerank(model.backbone, sims, tokens, batch["text"], k=2)
    assert aware[0].shape == (4, 4) and aware[1].shape == (4, 4)
    assert not torch.allclose(aware[0], blind[0])


def test_uniadapter_msrvtt_preset_counts_the_papers_parameters():
    config = load_run_config("uniadapter-msrvtt", [])
    video, text = config["model"]["encoders"]["video"], config["model"]["encoders"]["text"]
    assert video["options"]["frames"] == 8 and config["model"]["methods"][0]["frame_aware"] is True
    encoders = {  # the preset's towers built from BLIP-base's default config (shapes only)
        "video": {**video, "path": None, "config": {}},
        "text": {**text, "path": None, "config": {}},
    }
    with torch.device("meta"):
        model = build_model({**config["model"], "encoders": encoders})
    adapters = n_params(model.peft["uniadapter"])
    assert adapters == 4_784_640  # frame-aware attention adds no parameter: the image count
    base = n_params(model.backbone.encoders["text"].blip)
    assert 0.020 < adapters / base < 0.023  # the paper's 2.2%
    assert model.peft["head"].frames == 8


@pytest.mark.parametrize("order", ["mixer first", "head first"])
def test_temporal_transformer_and_the_blip_head_are_refused_together(order):
    config = video_config()
    mixer = {"name": "temporal_transformer", "heads": 2}
    config["methods"] = [mixer, *config["methods"]] if order == "mixer first" else [*config["methods"], mixer]
    with pytest.raises(ValueError, match="BLIP's retrieval head pools the frames itself"):
        build_model(config)
