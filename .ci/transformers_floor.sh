#!/usr/bin/env bash
# CI, after the main tests: the Hugging Face encoders and the four seed methods against the LOWEST
# transformers release that pyproject.toml claims (the `hf` extra), so the claimed range is tested at
# both ends (the main venv gets the newest). Own venv at .venv-floor, reused while its stamp matches.
# No timm/torchvision here: the timm cases of test_encoders_audio_timm.py skip themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

VENV=.venv-floor
TORCH_SPEC=${FLOOR_TORCH_SPEC:-torch==2.13.0}  # a CPU build on the team's local disk
floor=$(sed -n 's/.*"transformers>=\([0-9][0-9.]*\),.*/\1/p' pyproject.toml)
if [ -z "$floor" ]; then
    echo "transformers_floor.sh: no 'transformers>=X,' bound found in pyproject.toml" >&2
    exit 1
fi
TESTS=(
    tests/test_encoders_hf_text_vision.py
    tests/test_encoders_audio_timm.py
    tests/test_uniadapter.py
    tests/test_pmf.py
    tests/test_wander.py
    tests/test_mwa.py
    tests/test_wander_reference.py
    tests/test_uniadapter_reference.py
    tests/test_mwa_reference.py
)

start=$(date +%s)
stamp="$VENV/.installed-transformers-$floor"
if [ ! -f "$stamp" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q "transformers==$floor" "pytest>=8" "safetensors>=0.4" "pyyaml>=6" \
        numpy scipy pillow
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    touch "$stamp"
fi
echo "transformers floor: $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')" \
    "(claimed: $(sed -n 's/.*"\(transformers>=[^"]*\)".*/\1/p' pyproject.toml))"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
echo "transformers floor check finished in $(( $(date +%s) - start )) s"
