#!/usr/bin/env bash
# Train each method on a config without and with modality dropout, then sweep missing rates
# (mmpeft robustness) on each run; one summary table at the end (benchmarks/robustness_table.py).
#   bash benchmarks/robustness_runs.sh CONFIG PREFIX DROPOUT METHOD...
#   bash benchmarks/robustness_runs.sh avmnist-whisper-vit runs/miss '{audio: 0.5, image: 0.2}' \
#        late_fusion wander lora pmf missing_prompts
# Runs land in PREFIX-METHOD-plain and PREFIX-METHOD-drop; a finished run is kept, not retrained.
set -uo pipefail
config=$1 prefix=$2 dropout=$3
shift 3
MMPEFT=${MMPEFT:-mmpeft}
for method in "$@"; do
    for variant in plain drop; do
        out=$prefix-$method-$variant
        extra=()
        [ "$variant" = drop ] && extra=("train.modality_dropout=$dropout")
        if [ ! -f "$out/metrics.json" ]; then
            $MMPEFT -q train --config "$config" method="$method" "${extra[@]}" train.progress=false \
                --output "$out" --overwrite > "$out.log" 2>&1 || { echo "$out: training failed, see $out.log"; continue; }
        fi
        [ -f "$out/robustness/robustness.json" ] || $MMPEFT robustness --run "$out" >> "$out.log" 2>&1
    done
done
python3 "$(dirname "$0")/robustness_table.py" "$prefix"-*-plain "$prefix"-*-drop
