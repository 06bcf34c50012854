"""Costs of the seed methods that their papers claim and DESIGN §3 promises.

    python benchmarks/bench_seed_methods.py wander   # time and memory of Wander's fusion vs M and T
    python benchmarks/bench_seed_methods.py pmf      # PMF's training memory against full fine-tuning

wander: one training step of the Wander fusion alone (the frozen encoders' final states are
computed once, outside the step) for M = 2..6 modalities at fixed length, and for T = 32..512
tokens at M = 2. DESIGN §3.2: O(B · Σ_m T_m · r · d) time, so both sweeps should grow linearly.
pmf: one training step of PMF (K = 2) and of full fine-tuning on the same pair of 12-layer
encoders (toy widths 384/512 by default; ``--hf-base`` builds ViT-B/16 + BERT-base from their
configs with random weights). Li et al. report up to 66% less training memory (arXiv 2304.06306).
Each configuration runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import isolated, print_table, random_inputs, toy_encoder, train_step_numbers
from mmpeft import build_model

WANDER = {"name": "wander", "k": 16, "r": 16, "rank": 8}


def wander_case(M: int, T: int, args) -> dict:
    torch.manual_seed(0)
    encoders = {f"m{i}": toy_encoder(256, 1, T) for i in range(M)}
    model = build_model({"encoders": encoders, "methods": [WANDER], "head": {"num_outputs": 10}})
    model.to(args.device).train()
    inputs = random_inputs(encoders, args.batch, T, args.device)
    with torch.no_grad():
        states = model.backbone(inputs)  # frozen: computed once, the step measures Wander alone
    forward = lambda: model.peft["head"](model.fusion(states, model.backbone))
    numbers = train_step_numbers(model, forward, args.batch, 10, args.device, args.repeats)
    return {
        "M": M,
        "T": T,
        "wander_params": sum(p.numel() for p in model.peft["wander"].parameters()),
        **numbers,
    }


def hf_pair() -> dict:
    vit = {"model_type": "vit", "image_size": 224, "patch_size": 16}
    bert = {"model_type": "bert"}
    return {"image": {"type": "hf_vit", "config": vit}, "text": {"type": "hf_bert", "config": bert}}


def hf_inputs(batch: int, seq: int, device: str) -> dict:
    return {
        "image": {"pixel_values": torch.randn(batch, 3, 224, 224, device=device)},
        "text": {
            "input_ids": torch.randint(1000, 2000, (batch, seq), device=device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        },
    }


def pmf_case(method: str, args) -> dict:
    torch.manual_seed(0)
    if args.hf_base:
        encoders, inputs = hf_pair(), hf_inputs(args.batch, args.seq, args.device)
    else:
        encoders = {
            "image": toy_encoder(384, 12, args.seq, heads=6),
            "text": toy_encoder(512, 12, args.seq, heads=8),
        }
        inputs = random_inputs(encoders, args.batch, args.seq, args.device)
    methods = [{"name": "pmf", "num_fusion_layers": 2}] if method == "pmf" else [{"name": "full"}]
    model = build_model({"encoders": encoders, "methods": methods, "head": {"num_outputs": 101}})
    model.to(args.device).train()
    forward = lambda: model(inputs)["logits"]  # PMF: the average of its per-modality heads
    numbers = train_step_numbers(model, forward, args.batch, 101, args.device, args.repeats)
    return {"method": method, **numbers}


def run_wander(args) -> None:
    rows_m = [
        isolated(__file__, ["wander", "--only", f"{M},{args.seq}", *args.passthrough]) for M in range(2, 7)
    ]
    rows_t = [
        isolated(__file__, ["wander", "--only", f"2,{T}", *args.passthrough]) for T in (32, 64, 128, 256, 512)
    ]
    print(f"Wander fusion step (k=16, r=16, R=8, width 256), batch {args.batch}, {args.device}")
    cols = [
        ("M", "M", "d"),
        ("T", "tokens", "d"),
        ("wander_params", "Wander params", ","),
        ("saved_activations_mb", "activations (MB)", ".2f"),
        ("step_time_s", "step (s)", ".4f"),
    ]
    print_table(rows_m, cols)
    print()
    print_table(rows_t, cols)


def run_pmf(args) -> None:
    rows = [isolated(__file__, ["pmf", "--only", m, *args.passthrough]) for m in ("full", "pmf")]
    pair = "ViT-B/16 + BERT-base (random weights)" if args.hf_base else "12-layer toy pair (widths 384/512)"
    print(f"{pair}, batch {args.batch}, {args.seq} text tokens, {args.device}")
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("trainable", "trainable", ","),
            ("saved_activations_mb", "activations (MB)", ".1f"),
            ("peak_memory_mb", f"peak (MB, {rows[0]['peak_memory_kind']})", ".0f"),
            ("step_time_s", "step (s)", ".3f"),
        ],
    )
    full, pmf = rows
    saved = 1 - pmf["saved_activations_mb"] / full["saved_activations_mb"]
    print(f"PMF keeps {saved:.0%} fewer activations for backward than full fine-tuning")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=["wander", "pmf"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-base", action="store_true", help="pmf: ViT-B/16 + BERT-base configs")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [a for a in sys.argv[2:] if a != "--only"]
    if args.only and args.which == "wander":
        M, T = map(int, args.only.split(","))
        print(json.dumps(wander_case(M, T, args)))
    elif args.only:
        print(json.dumps(pmf_case(args.only, args)))
    else:
        (run_wander if args.which == "wander" else run_pmf)(args)


if __name__ == "__main__":
    main()
