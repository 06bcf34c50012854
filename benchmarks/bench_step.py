"""One training step of every method against the no-grad forward of the same model.

    python benchmarks/bench_step.py                    # ViT-B/16 + BERT-base (random weights), CPU
    python benchmarks/bench_step.py --toy              # a 12-layer toy pair (widths 384/512): fast
    python benchmarks/bench_step.py --device cuda --mixed-precision bf16
    python benchmarks/bench_step.py --toy --compile inductor --methods lora,pmf   # torch.compile'd

For each method, with and without ``gradient_checkpointing``: trainable parameters, the step time
(forward + cross-entropy + backward + AdamW, median of ``--repeats``) over the no-grad forward time
of the same model (the floor of every frozen-backbone method), the bytes autograd saves for
backward (exact) and the peak memory (CUDA allocator peak, or the growth of the process's resident
set on CPU: coarse). Each case runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from _common import isolated, print_table, random_inputs, toy_encoder, train_step_numbers
from bench_seed_methods import hf_inputs, hf_pair
from mmpeft import build_model

METHODS = {
    "full": {"name": "full"},
    "linear": {"name": "linear"},
    "lora": {"name": "lora", "r": 8},
    "adapter": {"name": "adapter"},
    "bitfit": {"name": "bitfit"},
    "prompt": {"name": "prompt"},
    "uniadapter": {"name": "uniadapter", "r": 128},
    "mwa": {"name": "mwa"},
    "pmf": {"name": "pmf", "num_fusion_layers": 2},
    "wander": {"name": "wander"},
}


def forward_time(model, inputs, repeats: int, device: str, autocast) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast():
                model(inputs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def case(method: str, checkpointing: bool, args) -> dict:
    torch.manual_seed(0)
    if args.toy:
        encoders = {
            "image": toy_encoder(384, 12, args.seq, heads=6),
            "text": toy_encoder(512, 12, args.seq, heads=8),
        }
        inputs = random_inputs(encoders, args.batch, args.seq, args.device)
    else:
        encoders, inputs = hf_pair(), hf_inputs(args.batch, args.seq, args.device)
    model = build_model({"encoders": encoders, "methods": [METHODS[method]], "head": {"num_outputs": 10}})
    model.to(args.device).train()
    model.backbone.gradient_checkpointing = checkpointing
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
    runner = torch.compile(model, backend=args.compile) if args.compile else model  # warmed up below
    forward = forward_time(runner, inputs, args.repeats, args.device, autocast)

    def logits():
        with autocast():
            return runner(inputs)["logits"].float()

    numbers = train_step_numbers(model, logits, args.batch, 10, args.device, args.repeats)
    return {
        "method": method,
        "checkpointing": "yes" if checkpointing else "no",
        "compile": args.compile or "no",
        "forward_s": forward,
        "ratio": numbers["step_time_s"] / forward,
        **numbers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--toy", action="store_true", help="a 12-layer toy pair instead of ViT-B + BERT-base")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--compile", metavar="BACKEND", help="torch.compile forward and step (e.g. inductor)")
    parser.add_argument("--checkpointing", default="both", choices=["both", "no", "yes"])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        method, ckpt = args.only.split(",")
        print(json.dumps(case(method, ckpt == "1", args)))
        return
    passthrough = [
        *("--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq)),
        *("--repeats", str(args.repeats), "--mixed-precision", args.mixed_precision),
        *(["--toy"] if args.toy else []),
        *(["--compile", args.compile] if args.compile else []),
    ]
    rows = [
        isolated(__file__, ["--only", f"{m},{int(c)}", *passthrough])
        for m in args.methods.split(",")
        for c in {"both": (False, True), "no": (False,), "yes": (True,)}[args.checkpointing]
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    pair = "12-layer toy pair (widths 384/512)" if args.toy else "ViT-B/16 + BERT-base (random weights)"
    print(
        f"{pair}, batch {args.batch}, {args.seq} text tokens, {args.device}, precision {args.mixed_precision}"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("checkpointing", "checkpointing", ""),
            ("compile", "compile", ""),
            ("trainable", "trainable", ","),
            ("forward_s", "no-grad forward (s)", ".3f"),
            ("step_time_s", "train step (s)", ".3f"),
            ("ratio", "step / forward", ".2f"),
            ("saved_activations_mb", "activations (MB)", ".1f"),
            ("peak_memory_mb", f"peak (MB, {rows[0]['peak_memory_kind']})", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
