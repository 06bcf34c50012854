"""One training step of full / linear / lora / prompt (deep, last 2 layers) on a 12-layer toy pair.

Shows the no-grad frozen prefix at work: methods that act only late in the network keep no
activations for the early blocks. Each method runs in its own process so peak-memory numbers
do not leak between methods.

    python benchmarks/bench_foundation.py [--device cuda] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from mmpeft import build_model
from mmpeft.profiling import measure_train_step
from mmpeft.report import trainable_and_total

METHODS = {
    "full": [{"name": "full"}],
    "linear": [{"name": "linear"}],
    "lora": [{"name": "lora", "r": 8, "targets": ["q", "v"]}],
    "lora_last2": [{"name": "lora", "r": 8, "targets": ["q", "v"], "layers": [-2, -1]}],
    "prompt_deep_last2": [{"name": "prompt", "num_prompts": 8, "deep": True, "layers": [-2, -1]}],
}


def toy_pair(depth: int, seq: int) -> dict:
    enc = lambda dim, heads, inp: {
        "type": "toy",
        "config": {"input_dim": inp, "dim": dim, "depth": depth, "heads": heads, "max_len": seq},
    }
    return {"text": enc(256, 4, 64), "image": enc(384, 6, 96)}


def run_one(name: str, args) -> dict:
    torch.manual_seed(0)
    encoders = toy_pair(args.depth, args.seq)
    model = build_model({"encoders": encoders, "methods": METHODS[name], "head": {"num_outputs": 10}})
    model.to(args.device).train()
    batch = {
        m: {"values": torch.randn(args.batch, args.seq, e["config"]["input_dim"], device=args.device)}
        for m, e in encoders.items()
    }
    target = torch.randint(0, 10, (args.batch,), device=args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(batch)["logits"], target)
        loss.backward()
        opt.step()
        return loss

    trainable, total = trainable_and_total(model)
    result = measure_train_step(step, model.parameters(), repeats=args.repeats, device=args.device)
    return {
        "method": name,
        "trainable": trainable,
        "total": total,
        "first_trainable_step": model.backbone.first_trainable_step(),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", help="run one method in this process and print JSON")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    rows = []
    for name in METHODS:
        cmd = [sys.executable, __file__, "--only", name, *sys.argv[1:]]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"12-layer toy pair (widths 256/384), batch {args.batch}, seq {args.seq}, device {args.device}")
    print(
        f"{'method':<20}{'trainable':>12}{'grad from step':>16}{'saved act. MB':>15}{'peak MB':>10}{'step s':>9}"
    )
    for r in rows:
        print(
            f"{r['method']:<20}{r['trainable']:>12,}{r['first_trainable_step']:>16}"
            f"{r['saved_activations_mb']:>15.1f}{r['peak_memory_mb']:>10.1f}{r['step_time_s']:>9.3f}"
        )
    print(f"(peak MB = {rows[0]['peak_memory_kind']})")


if __name__ == "__main__":
    main()
