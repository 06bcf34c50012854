"""Tiny backbones and per-method test configs shared by the generated tests.

Every registered method needs an entry in METHOD_CASES (a registry test checks it). The toy
encoders deliberately differ in width, depth, heads and CLS use to expose alignment bugs.
"""

from __future__ import annotations

import copy

import torch

TOY = {
    "text": {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2, "heads": 4}},
    "image": {"type": "toy", "config": {"input_dim": 6, "dim": 48, "depth": 3, "heads": 4}},
    "audio": {
        "type": "toy",
        "config": {"input_dim": 5, "dim": 24, "depth": 4, "heads": 2, "cls_token": False},
    },
}
EQUAL = {
    "text": {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2, "heads": 4}},
    "image": {"type": "toy", "config": {"input_dim": 6, "dim": 32, "depth": 3, "heads": 2}},
}
TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
VIDEO = {  # 2 frames per clip through a tiny random timm ViT (needs timm)
    "video": {"type": "video", "config": TINY_VIT, "options": {"image_type": "timm_vit", "frames": 2}},
    "text": TOY["text"],
}
BACKBONES = {
    "pair": {m: TOY[m] for m in ("text", "image")},
    "triple": TOY,
    "pair_equal": EQUAL,
    "video_pair": VIDEO,
}
VIDEO_METHODS = {
    "temporal",
    "temporal_transformer",
}  # methods that need a video tower: their cases run on video_pair only

# method name -> options for the contract tests (small sizes; every option family exercised
# somewhere). Extra variants of one method go under "name:variant".
METHOD_CASES: dict[str, dict] = {
    "full": {},
    "linear": {},
    "probe": {"alphas": [1.0]},  # fitted in closed form by the trainer; the contract trains its head
    "late_fusion": {"proj_dim": 16},
    "lora": {"r": 4, "targets": ["q", "v", "fc1"]},
    "lora:text_only": {"r": 2, "modalities": ["text"], "layers": [-1]},
    "bitfit": {"targets": ["q", "v", "o", "fc1", "fc2"]},  # the key bias is inert under softmax (docs)
    "adapter": {"r": 4, "placement": "houlsby", "activation": "gelu"},
    "adapter:pfeiffer": {"r": 4, "placement": "pfeiffer", "layers": [-1]},
    "adaptformer": {"r": 4},
    "prompt": {"num_prompts": 3, "deep": True},
    "prompt:shallow": {"num_prompts": 2, "deep": False},
    "tfn": {"proj_dim": 4},
    "lmf": {"proj_dim": 8, "rank": 3},
    "uniadapter": {"r": 4},
    "uniadapter:unshared": {"r": 3, "share": False, "scale": 0.5, "dropout": 0.1, "layers": [-1]},
    "mwa": {"r": 4, "enhancer_dim": 8},
    "mwa:released": {"r": 4, "scale": 0.6, "enhancer_layers": None, "enhancer_dim": None},
    "mwa:text_only": {"modalities": ["text"], "layers": [-1], "enhancer_width": 16, "enhancer_dim": 4},
    "wander": {"k": 3, "r": 4, "rank": 2},
    "wander:factor_sum": {"k": 4, "r": 4, "rank": 2, "token_rank": 3, "cp_mode": "factor_sum"},
    "wander:pooled": {"k": 2, "r": 3, "rank": 3, "residual": "pooled", "output": "mean", "anchor": "image"},
    "wander:width": {"k": 2, "r": 3, "rank": 2, "d": 20, "residual": "none", "max_len": 12},
    "wander:layers": {"k": 2, "r": 4, "rank": 2, "layers": [-2, -1]},
    "pmf": {"num_qp": 2, "num_qcp": 2, "num_fcp": 2},
    "pmf:concat": {"num_fusion_layers": 1, "num_qcp": 0, "head": "concat", "mlp_hidden": 8},
    "missing_prompts": {"num_prompts": 2},
    "missing_prompts:layers": {"num_prompts": 3, "layers": [0, -1], "modalities": ["text", "image"]},
    "temporal": {},
    "temporal_transformer": {"heads": 2, "dropout": 0.0},
    "temporal_transformer:narrow": {"width": 8, "depth": 2, "heads": 2},
    "pmf:frozen_fcp": {"num_qp": 1, "num_qcp": 1, "num_fcp": 1, "train_fcp": False},
}


def method_entry(case: str) -> dict:
    name = case.split(":")[0]
    return {"name": name, **METHOD_CASES[case]}


def model_config(backbone: str, methods: list[dict], num_outputs: int = 3) -> dict:
    encoders = copy.deepcopy(BACKBONES[backbone])  # tests may edit their copy
    return {"encoders": encoders, "methods": methods, "head": {"num_outputs": num_outputs}}


def toy_batch(encoders: dict, batch_size: int = 3, seed: int = 0) -> dict:
    """Random inputs for toy encoders; later rows are padded so masks matter."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for j, (m, spec) in enumerate(encoders.items()):
        cfg = spec["config"]
        if spec["type"] == "video":  # B clips of N frames: the frame tower's batch of B·N images
            frames, size = spec["options"]["frames"], cfg["img_size"]
            batch[m] = torch.rand(batch_size * frames, 3, size, size, generator=g)
            continue
        T = min(cfg.get("max_len", 16), 5 + 2 * j)
        values = torch.randn(batch_size, T, cfg["input_dim"], generator=g)
        mask = torch.ones(batch_size, T, dtype=torch.long)
        for b in range(1, batch_size):
            mask[b, T - b :] = 0  # row b has b padded steps
        batch[m] = {"values": values, "attention_mask": mask}
    return batch
