"""One training step of full / linear / lora / prompt (deep, last 2 layers) on a 12-layer toy pair.

Shows the no-grad frozen prefix at work: methods that act only late in the network keep no
activations for the early blocks. Each method runs in its own process so peak-memory numbers
do not leak between methods.

    python benchmarks/bench_foundation.py [--device cuda] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import isolated, print_table, random_inputs, toy_encoder, train_step_numbers
from mmpeft import build_model

METHODS = {
    "full": [{"name": "full"}],
    "linear": [{"name": "linear"}],
    "lora": [{"name": "lora", "r": 8, "targets": ["q", "v"]}],
    "lora_last2": [{"name": "lora", "r": 8, "targets": ["q", "v"], "layers": [-2, -1]}],
    "prompt_deep_last2": [{"name": "prompt", "num_prompts": 8, "deep": True, "layers": [-2, -1]}],
}


def run_one(name: str, args) -> dict:
    torch.manual_seed(0)
    encoders = {
        "text": toy_encoder(256, args.depth, args.seq, heads=4),
        "image": toy_encoder(384, args.depth, args.seq, heads=6, input_dim=96),
    }
    model = build_model({"encoders": encoders, "methods": METHODS[name], "head": {"num_outputs": 10}})
    model.to(args.device).train()
    inputs = random_inputs(encoders, args.batch, args.seq, args.device)
    forward = lambda: model(inputs)["logits"]
    numbers = train_step_numbers(model, forward, args.batch, 10, args.device, args.repeats)
    return {"method": name, "grad_from_step": model.backbone.first_trainable_step(), **numbers}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="run one method in this process and print JSON")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    argv = sys.argv[1:]
    rows = [isolated(__file__, ["--only", name, *argv]) for name in METHODS]
    print(
        f"{args.depth}-layer toy pair (widths 256/384), batch {args.batch}, {args.seq} tokens, {args.device}"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("trainable", "trainable params", ","),
            ("grad_from_step", "autograd from step", "d"),
            ("saved_activations_mb", "activations saved (MB)", ".1f"),
            ("peak_memory_mb", f"peak memory (MB, {rows[0]['peak_memory_kind']})", ".0f"),
            ("step_time_s", "step time (s)", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()
