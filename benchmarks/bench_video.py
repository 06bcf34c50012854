"""UniAdapter on 8-frame clips vs single images: step time, saved activations and peak memory.

The image tower is a ViT-B/16-shaped timm ViT (random weights, 224², or smaller with --small) and
the text tower a BERT-base-shaped encoder; the video tower runs the same ViT on N frames per clip
as one batch of B·N frames. Each case runs in its own process (peak memory is per process):

    python benchmarks/bench_video.py                 # B 4, frames 8, ViT-B/16 + BERT-base
    python benchmarks/bench_video.py --small --device cuda

Expect both time and memory to grow about N-fold: every frame goes through every adapted block.
"""

from __future__ import annotations

import argparse
import json

import torch

from _common import isolated, print_table, train_step_numbers
from mmpeft import build_model

VIT_B = {"model_name": "vit_base_patch16_224", "num_classes": 0}
VIT_SMALL = {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 192, "num_heads": 3, "num_classes": 0}
BERT_BASE = {"model_type": "bert", "vocab_size": 30522}
BERT_SMALL = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 192, "num_hidden_layers": 4,
              "num_attention_heads": 3, "intermediate_size": 768}  # fmt: skip


def case(kind: str, args) -> dict:
    torch.manual_seed(0)
    vit = VIT_SMALL if args.small else VIT_B
    size = vit.get("img_size", 224)
    image = {"type": "timm_vit", "config": vit}
    if kind == "video":
        image = {"type": "video", "config": vit, "options": {"image_type": "timm_vit", "frames": args.frames}}
    text = {"type": "hf_bert", "config": BERT_SMALL if args.small else BERT_BASE}
    encoders = {kind: image, "text": text}
    model = build_model({"encoders": encoders, "methods": [{"name": "uniadapter", "r": 128}],
                         "head": {"num_outputs": 10}})  # fmt: skip
    model.to(args.device).train()
    rows = args.batch * (args.frames if kind == "video" else 1)
    inputs = {
        kind: torch.randn(rows, 3, size, size, device=args.device),
        "text": {"input_ids": torch.randint(0, 1000, (args.batch, 32), device=args.device)},
    }
    numbers = train_step_numbers(
        model, lambda: model(inputs)["logits"].float(), args.batch, 10, args.device, args.repeats
    )
    return {"input": f"{args.frames}-frame clips" if kind == "video" else "images", **numbers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--small", action="store_true", help="a 4-block ViT at 64² and a 4-block BERT")
    p.add_argument("--only", choices=["image", "video"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(case(args.only, args)))
        return
    passthrough = ["--batch", str(args.batch), "--frames", str(args.frames), "--repeats", str(args.repeats),
                   "--device", args.device] + (["--small"] if args.small else [])  # fmt: skip
    rows = [isolated(__file__, ["--only", k, *passthrough]) for k in ("image", "video")]
    for r in rows[1:]:
        r["time_x"] = r["step_time_s"] / rows[0]["step_time_s"]
        r["memory_x"] = r["peak_memory_mb"] / max(rows[0]["peak_memory_mb"], 1e-9)
    rows[0]["time_x"] = rows[0]["memory_x"] = 1.0
    print(f"uniadapter r 128, batch {args.batch}, device {args.device} ({rows[0]['peak_memory_kind']})")
    print_table(
        rows,
        [("input", "input", "s"), ("trainable", "trainable", ",d"), ("step_time_s", "step (s)", ".3f"),
         ("time_x", "× images", ".1f"), ("saved_activations_mb", "saved activations (MB)", ".0f"),
         ("peak_memory_mb", "peak memory (MB)", ".0f"), ("memory_x", "× images", ".1f")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
