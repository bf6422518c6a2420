#!/bin/bash
# The GPU checks of one short GPU lease, most wanted first, each cut off at what is left of
# DEADLINE_S, every log and table written to OUT_DIR:
#
#   1. bench/gpu_bench.py at the 0.5B shape: align's defaults with the value head and the critic,
#      TRL 1.12's PPOTrainer, the critic decoding eagerly and not compiled, FSDP2 in one process;
#   2. tests/cuda;
#   3. RLOO and GRPO at the 0.5B shape; the 1.5B shape (gradient checkpointing); the critic at 256
#      new tokens.
#
#   DATA=../shared/data WHEELS=.whl OUT_DIR=out DEADLINE_S=780 [PYTHON=python3] bash bench/gpu_session.sh
#
# DATA: hh-rlhf/ and oasst/ (bench/gpu_bench.py reads them); WHEELS: a folder holding TRL 1.12.0,
# datasets, dill and multiprocess wheels where the machine cannot install packages (they go into
# the bench's own TRL folder, beside the machine's torch / transformers / peft / accelerate). The
# later 0.5B steps reuse the first step's model and reward model (--reuse).
set -u
DATA=${DATA:-../shared/data}
OUT_DIR=${OUT_DIR:-out}
DEADLINE_S=${DEADLINE_S:-780}
WORK=${WORK:-/tmp/align-gpu-bench}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR" "$WORK/trl"
start=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }

step() {  # step NAME COMMAND...: run it with what time is left, its output in OUT_DIR/NAME.log
    local name=$1; shift
    local budget; budget=$(left)
    if [ "$budget" -lt 30 ]; then echo "$name: skipped, ${budget} s left"; return; fi
    local t=$(date +%s)
    timeout "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
    echo "$name: rc=$? in $(( $(date +%s) - t )) s"
    grep -v "Writing model\|Loading weights\|warn" "$OUT_DIR/$name.log" | tail -25
}

if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/trl/trl" "$WHEELS"/trl-*.whl
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/trl/deps" \
        "$WHEELS"/datasets-*.whl "$WHEELS"/dill-*.whl "$WHEELS"/multiprocess-*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step bench-0.5b "$PYTHON" bench/gpu_bench.py --data "$DATA" --work "$WORK" --iterations 3 --eager reward_model --fsdp
cp "$WORK/0.5b/results.json" "$OUT_DIR/results-0.5b.json" 2>/dev/null
step cuda-tests "$PYTHON" -m pytest tests/cuda -q -p no:cacheprovider -o addopts=-ra
step bench-roads "$PYTHON" bench/gpu_bench.py --data "$DATA" --work "$WORK" --reuse --iterations 3 --no-trl \
    --value-models "" --roads
step bench-1.5b "$PYTHON" bench/gpu_bench.py --data "$DATA" --work "$WORK" --shape 1.5b --iterations 2 --no-trl \
    --value-models policy_trunk
step bench-critic-256 "$PYTHON" bench/gpu_bench.py --data "$DATA" --work "$WORK" --reuse --iterations 2 --no-trl \
    --value-models reward_model --response-length 256
echo "done in $(( $(date +%s) - start )) s"
