#!/bin/bash
# The GPU checks of one short GPU lease, in one device command. A lease is rare and short (one
# command is killed at 600 s, and the machine's start counts too), so the checks run most wanted
# first, each with a cap of its own, and whatever the deadline cuts is the least wanted:
#
#   1. tests/cuda: the only check of the GPU-only code paths (CUDA graphs, Triton kernels, bf16);
#   2. bench/gpu_bench.py at the 0.5B shape: align's defaults with the value head and with the critic,
#      and TRL 1.12's PPOTrainer, in one run on one machine (the comparison the README still lacks);
#   3. the optional rows: the critic decoding eagerly and not compiled, FSDP2 in one process; RLOO and
#      GRPO; the 1.5B shape (gradient checkpointing: does it fit?); the critic at 256 new tokens.
#
#   DATA=.gpudata WHEELS=.whl OUT_DIR=$OUT DEADLINE_S=540 [PYTHON=python3] bash bench/gpu_session.sh
#
# DATA: hh-rlhf/ and oasst/ (bench/gpu_bench.py reads them); WHEELS: a folder holding the TRL 1.12.0,
# datasets, dill and multiprocess wheels where the machine cannot reach the index (gpu_bench.py
# installs them beside the machine's torch / transformers / peft / accelerate; without them TRL's row
# fails with pip's reason and align's rows still run). The later 0.5B steps reuse the first step's
# model and reward model (--reuse).
#
# What comes back: the device returns at most 8 files from $OUT, so everything goes into ONE archive,
# OUT_DIR/work.tgz, rewritten after every step (a cut-off leaves the earlier steps' files): per step,
# its output and the workers' logs, metrics.jsonl, summary and result files it wrote, under the
# step's name (later steps rewrite the same files in WORK).
set -u
DATA=${DATA:-../shared/data}
OUT_DIR=${OUT_DIR:-${OUT:-out}}  # the device's $OUT: what is written there comes back
DEADLINE_S=${DEADLINE_S:-540}
WORK=${WORK:-/tmp/align-gpu-bench}
PYTHON=${PYTHON:-python3}
RESERVE_S=20  # kept back from every step: timeout's 15 s before SIGKILL, then the archive
if ! [[ $DEADLINE_S =~ ^[0-9]+$ ]] || [ "$DEADLINE_S" -gt 570 ]; then
    echo "DEADLINE_S=$DEADLINE_S: give whole seconds, at most 570 (the device kills a command at 600 s)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT_DIR" "$WORK" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
COLLECT=$(mktemp -d)  # the archive's contents, step by step
trap 'rm -rf "$COLLECT" "$COLLECT.tgz"' EXIT
start=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }

archive() {  # COLLECT -> OUT_DIR/work.tgz, replaced only by a whole archive
    tar czf "$COLLECT.tgz" -C "$COLLECT" . && cp "$COLLECT.tgz" "$OUT_DIR/work.tgz"
}

step() {  # step NAME CAP COMMAND...: run it for at most min(CAP, what is left - RESERVE_S) s
    local name=$1 cap=$2; shift 2
    local budget; budget=$(( $(left) - RESERVE_S ))
    [ "$cap" -lt "$budget" ] && budget=$cap
    if [ "$budget" -lt 30 ]; then echo "$name: skipped, $(left) s left"; return; fi
    mkdir -p "$COLLECT/$name"
    local stamp=$COLLECT/$name/.started t; touch "$stamp"; t=$(date +%s)
    # -k: a process stuck in a driver call ignores SIGTERM; timeout signals the whole process group
    timeout -k 15 "$budget" "$@" > "$COLLECT/$name/step.log" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="$rc (cut off at its ${budget} s)"
    echo "$name: rc=$rc in $(( $(date +%s) - t )) s"
    grep -v "Writing model\|Loading weights\|warn" "$COLLECT/$name/step.log" | tail -12
    # the files this step's workers wrote, before a later step rewrites them (no weights: by name)
    (cd "$WORK" && find . -type f -newer "$stamp" \( -name '*.log' -o -name metrics.jsonl -o -name summary.json \
        -o -name '*-result.json' -o -name results.json -o -name model-info.json -o -name profile.txt \) -print0 |
        xargs -0 -r cp --parents -t "$COLLECT/$name")
    rm -f "$stamp"
    archive
}

if command -v nvidia-smi > /dev/null; then
    timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
bench=("$PYTHON" bench/gpu_bench.py --data "$DATA" --work "$WORK")  # an array: timeout runs no shell function
trl=(--trl-wheels "${WHEELS:-}")
[ -n "${WHEELS:-}" ] || trl=()

step cuda-tests 150 "$PYTHON" -m pytest tests/cuda -q -p no:cacheprovider -o addopts=-ra
# gpu_bench.py runs its rows in their order of importance: align's defaults (value head, critic), then TRL
step bench-0.5b 240 "${bench[@]}" --iterations 3 ${trl[@]+"${trl[@]}"}
step bench-0.5b-eager-fsdp 120 "${bench[@]}" --reuse --iterations 3 --no-trl --value-models "" --eager reward_model --fsdp
step bench-roads 90 "${bench[@]}" --reuse --iterations 3 --no-trl --value-models "" --roads
step bench-1.5b 150 "${bench[@]}" --shape 1.5b --iterations 2 --no-trl --value-models policy_trunk
step bench-critic-256 90 "${bench[@]}" --reuse --iterations 2 --no-trl --value-models reward_model --response-length 256
archive
echo "done in $(( $(date +%s) - start )) s; $OUT_DIR/work.tgz"
