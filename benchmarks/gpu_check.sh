#!/usr/bin/env bash
# The GPU check of issue 11, one short script for a lent GPU machine (about 5 minutes on an H100/H200):
#   1. bf16 train-step / no-grad-forward ratios and peak allocator memory of every method on
#      ViT-B/16 + BERT-base (benchmarks/bench_step.py, random weights, batch 32, no checkpointing);
#   2. from those rows: PMF's peak memory against full fine-tuning (Li et al., CVPR 2023, report up
#      to 66% less) and MWA's step time against full's (Long et al., ICASSP 2024: up to 57% less);
#   3. a 1-GPU FSDP smoke run of the toy config through examples/accelerate/fsdp-gpus.yaml, and its
#      adapter's layout against a single-process run's.
# Uses the machine's own python3 (PyTorch, transformers, timm, accelerate) with this checkout's src/.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (DEVICE=cpu BATCH=2 METHODS=lora,full: a dry run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-32}
METHODS=${METHODS:-full,linear,lora,adapter,bitfit,prompt,uniadapter,mwa,pmf,wander}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY -c "import torch, transformers, accelerate, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== 1. bench_step ($DEVICE, bf16, batch $BATCH)"
precision=bf16; [ "$DEVICE" = cpu ] && precision=no
$PY benchmarks/bench_step.py --device "$DEVICE" --mixed-precision $precision --batch "$BATCH" --repeats 3 \
    --checkpointing no --methods "$METHODS" --json "$OUT/bench_step.json" | tee "$OUT/bench_step.md"

echo "== 2. against full fine-tuning"
$PY - "$OUT/bench_step.json" <<'PY' | tee "$OUT/versus_full.md"
import json, sys
rows = {r["method"]: r for r in json.load(open(sys.argv[1]))}
full = rows.get("full")
if full is None:
    sys.exit("no 'full' row to compare with")
for name, key, what, paper in [("pmf", "peak_memory_mb", "peak memory", "up to 66% less (Li et al., CVPR 2023)"),
                               ("mwa", "step_time_s", "train step time", "up to 57% less (Long et al., ICASSP 2024)")]:
    if name in rows:
        less = 1 - rows[name][key] / full[key]
        print(f"{name} {what}: {rows[name][key]:.3f} vs full {full[key]:.3f} -> {100 * less:.0f}% less; paper: {paper}")
PY

echo "== 3. FSDP smoke run (1 process)"
if [ "$DEVICE" = cuda ]; then
    rm -rf "$OUT/fsdp" "$OUT/single"
    $PY -m accelerate.commands.launch --config_file examples/accelerate/fsdp-gpus.yaml --num_processes 1 \
        -m mmpeft.cli.main -q train --config toy train.epochs=2 train.tensorboard=false --output "$OUT/fsdp" \
        > "$OUT/fsdp.log" 2>&1; echo "fsdp run exit $?"
    $PY -m mmpeft.cli.main -q train --config toy train.epochs=2 train.tensorboard=false --output "$OUT/single" \
        > "$OUT/single.log" 2>&1; echo "single run exit $?"
    $PY - "$OUT" <<'PY' | tee "$OUT/fsdp.md"
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
try:
    a = load_file(f"{out}/single/adapter/adapter_model.safetensors")
    b = load_file(f"{out}/fsdp/adapter/adapter_model.safetensors")
    m = json.load(open(f"{out}/fsdp/metrics.json"))
except Exception as e:  # the run failed: its log says why
    sys.exit(f"FSDP smoke run: no adapter to compare ({e}); see fsdp.log")
same = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
print(f"FSDP: distributed_type {m['distributed_type']}, test {m['test']}; adapter layout equal to single-process: {same}")
PY
    tail -5 "$OUT/fsdp.log"
else
    echo "skipped (needs a GPU: Accelerate runs FSDP configs as DDP on CPUs)"
fi
