#!/usr/bin/env bash
# Rebuild the default model (checkpoints/shapes-sf, its teacher, fast decoder and quantized variant) from nothing,
# with the trainer's stages, in about 3.7 hours of this 2-core CPU (docs/default-model.md, "Rebuilding from
# scratch"; the measured times and figures are in benchmarks/RESULTS.md).
#
#   bash scripts/rebuild-default-model.sh [RUN_DIR [STAGE ...]]     # RUN_DIR defaults to runs/rebuild
#
# Stages, in order (each stage's directory is RUN_DIR/STAGE; a stage reads only the earlier stages' outputs):
#   vae1      VAE from scratch on 5-frame windows (posterior mode, object pixels weighted)       2 processes
#   vae2      17-frame windows + colour alignment                                                2 processes
#   vae3      49-frame windows (colours hold past the causal caches' reach); its base/ is the    2 processes
#             chain's base: VAE, a seeded random tiny UMT5, the shapes word tokenizer
#   teacher1  bidirectional teacher from scratch on 3000 cached one-prompt clips, its text       2 processes
#             encoder trained with it
#   teacher2  the teacher fine-tuned on 4000 clips, 30% with a prompt switch (timeline           2 processes
#             conditioning; the text encoder frozen): the chain's teacher
#   ode       ODE bank (4096 teacher trajectories) + the causal student's ODE init               2 processes
#   dmd       Self-Forcing DMD (+ 2 x regression on the bank) against the teacher                1 process  } side
#   switch    switch-aware DMD (30% switch prompts, KV re-cache): the shipped student            1 process  } by
#   fastdec   fast streaming decoder distilled from the VAE decoder (on the ODE init's latents)  1 process  } side
#   vq        the quantized variant (VQ head + DMD) from the shipped student                      1 process  } side
#   eval      the evaluator: short clips (student, ODE init, teacher), switches, 2-minute        1 process  } by side
#             streams (RUN_DIR/eval-*/result.json and .log)
#   ship      the VQ variant scored beside the student (RUN_DIR/eval-vq), then RUN_DIR/shapes-sf, RUN_DIR/shapes-teacher,
#             RUN_DIR/shapes-sf-vq: engine directories with model cards (scripts/rebuild_card.py: each stage's
#             command and time, the evaluations' tables)
#
# Every stage has a fixed step count (what makes a run reproducible) and a wall-clock cap; running the script again
# resumes each unfinished stage from its newest checkpoint (an interrupted stage loses at most one checkpoint
# interval) and passes over finished ones in seconds. Logs: RUN_DIR/STAGE.log. With CHECK=1 every training stage
# only resolves its config (--print-config: unknown keys and bad values are refused) and nothing is run.
set -euo pipefail
cd "${REPO:-$(dirname "$0")/..}"   # REPO: the repository root, when this file is run from a copy
R=${1:-runs/rebuild}
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(vae1 vae2 vae3 teacher1 teacher2 ode dmd+switch+fastdec vq+eval ship)
mkdir -p "$R"
export OMP_NUM_THREADS=1 PYTHONPATH=.
DP=(torchrun --standalone --nproc_per_node 2 -m engine train)
ONE=(python -m engine train)
[ "${CHECK:-0}" = 1 ] && DP=("${ONE[@]}")   # a config check needs no second process

run() {  # run STAGE COMMAND...: the stage's log is RUN_DIR/STAGE.log; a finished stage leaves RUN_DIR/STAGE/DONE
    local stage=$1; shift
    if [ -e "$R/$stage/DONE" ]; then echo "$stage: done"; return; fi
    if [ "${CHECK:-0}" = 1 ]; then
        "$@" --print-config >/dev/null || { echo "$stage: bad config" >&2; return 1; }
        echo "$stage: config ok"; return
    fi
    echo "$stage: $(date -u +%H:%M:%S) start"
    local t0=$SECONDS
    echo "+ $*" >>"$R/$stage.log"
    "$@" >>"$R/$stage.log" 2>&1 || { echo "$stage: failed, see $R/$stage.log" >&2; return 1; }
    echo "$stage: $(date -u +%H:%M:%S) end, $(( (SECONDS - t0) / 60 )) min" | tee -a "$R/times.txt"
}

finished() {  # finished STAGE MAX_STEPS: mark the stage done when its run reached MAX_STEPS
    local last
    [ "${CHECK:-0}" = 1 ] && return
    last=$(ls "$R/$1/checkpoints" 2>/dev/null | sed -n 's/^step-0*\([0-9]*\)$/\1/p' | sort -n | tail -1)
    if [ "${last:-0}" -ge "$2" ]; then touch "$R/$1/DONE"; else
        echo "$1: stopped at step ${last:-0} of $2 (wall-clock cap); run the script again to resume" >&2; return 1; fi
}

vae1() {
    run vae1 "${DP[@]}" vae --config configs/shapes-vae.yaml --output-dir "$R/vae1" --resume --models.init null \
        --vae.clip_frames 5 --train.batch_size 2 --vae.align_weight 0 --optim.lr 2e-3 --optim.warmup_steps 30 \
        --max-steps 700 --minutes 15 && finished vae1 700
}
vae2() {
    run vae2 "${DP[@]}" vae --config configs/shapes-vae.yaml --output-dir "$R/vae2" --resume \
        --models.init "$R/vae1/base" --max-steps 900 --minutes 28 && finished vae2 900
}
vae3() {
    run vae3 "${DP[@]}" vae --config configs/shapes-vae-long.yaml --output-dir "$R/vae3" --resume \
        --models.init "$R/vae2/base" --max-steps 250 --minutes 25 && finished vae3 250
}
teacher1() {
    run teacher1 "${DP[@]}" teacher --config configs/shapes-teacher-scratch.yaml --output-dir "$R/teacher1" --resume \
        --models.base "$R/vae3/base" --data.path "$R/latents" --max-steps 6500 --minutes 65 && finished teacher1 6500
}
teacher2() {
    run teacher2 "${DP[@]}" teacher --config configs/shapes-teacher.yaml --output-dir "$R/teacher2" --resume \
        --models.base "$R/teacher1/teacher" --models.init "$R/teacher1/teacher" --data.path "$R/latents-switch" \
        --max-steps 2000 --optim.lr 3e-4 --optim.warmup_steps 50 --minutes 30 && finished teacher2 2000
}
ode() {
    run ode "${DP[@]}" ode-init --config configs/shapes-ode-init.yaml --output-dir "$R/ode" --resume \
        --models.teacher "$R/teacher2/teacher" --max-steps 1800 --minutes 40 && finished ode 1800
}
dmd() {
    run dmd "${ONE[@]}" dmd --config configs/shapes-dmd.yaml --output-dir "$R/dmd" --resume \
        --models.teacher "$R/teacher2/teacher" --models.generator "$R/ode/generator" --models.ode_bank "$R/ode" \
        --dmd.regression_weight 2 --max-steps 2000 --minutes 30 && finished dmd 2000
}
fastdec() {  # its own trainer (engine.training.fast_decoder): a run ends on its clock, not a step count
    if [ -e "$R/fastdec/DONE" ]; then echo "fastdec: done"; return; fi
    run fastdec "${ONE[@]}" fast-decoder --config fast-decoder --output-dir "$R/fastdec" --resume \
        --checkpoint "$R/ode/generator" --encoded_clips 160 --generated_clips 160 --minutes 25 \
        && { [ "${CHECK:-0}" = 1 ] || { [ -e "$R/fastdec/fast_decoder" ] && touch "$R/fastdec/DONE"; }; }
}
switch() {
    run switch "${ONE[@]}" dmd --config configs/shapes-dmd-switch.yaml --output-dir "$R/switch" --resume \
        --models.teacher "$R/teacher2/teacher" --models.generator "$R/dmd/generator" --minutes 20 \
        && finished switch 1500
}
vq() {
    run vq "${ONE[@]}" vq-dmd --config configs/shapes-vq-dmd.yaml --output-dir "$R/vq" --resume \
        --models.base "$R/switch/generator" --models.generator "$R/switch/generator" \
        --models.teacher "$R/teacher2/teacher" --max-steps 2000 --minutes 25 && finished vq 2000
}
evaluate() {  # the model card's figures: short clips (student, its ODE init, teacher), switches, 2-minute streams
    [ "${CHECK:-0}" = 1 ] && { echo "eval: nothing to check"; return; }
    local E=(python -m engine eval --threads 1) G="$R/switch/generator" name
    for name in short teacher switches long; do mkdir -p "$R/eval-$name"; done
    run eval-short "${E[@]}" --checkpoint "$R/ode/generator" "$G" --json "$R/eval-short/result.json" \
        && touch "$R/eval-short/DONE"
    run eval-teacher "${E[@]}" --checkpoint "$R/teacher2/teacher" --teacher-steps 32 --guidance 3 \
        --json "$R/eval-teacher/result.json" && touch "$R/eval-teacher/DONE"
    run eval-switches "${E[@]}" --checkpoint "$G" --long-seconds 60 --switch-every 10 --limit 8 \
        --seeds 0 1 2 3 4 5 6 7 --json "$R/eval-switches/result.json" && touch "$R/eval-switches/DONE"
    run eval-long "${E[@]}" --checkpoint "$G" --long-seconds 120 --limit 8 --seeds 0 1 2 3 \
        --json "$R/eval-long/result.json" && touch "$R/eval-long/DONE"
}
ship() {  # the quantized variant scored beside the student, then the three engine directories with their cards
    [ "${CHECK:-0}" = 1 ] && return
    mkdir -p "$R/eval-vq"
    run eval-vq python -m engine eval --threads 1 --checkpoint "$R/switch/generator" "$R/vq/generator" \
        --json "$R/eval-vq/result.json" && touch "$R/eval-vq/DONE"
    local kind out src
    for kind in student teacher vq; do
        case $kind in student) out=shapes-sf src=switch/generator ;; teacher) out=shapes-teacher src=teacher2/teacher ;;
                      vq) out=shapes-sf-vq src=vq/generator ;; esac
        python scripts/rebuild_card.py "$R" $kind "$R/$out.md"
        python -m engine ship "$R/$src" --out "$R/$out" --card "$R/$out.md" --force
    done
    cp -r "$R/fastdec/fast_decoder" "$R/shapes-sf/"
}

for s in "${STAGES[@]}"; do
    case $s in
        vae1|vae2|vae3|teacher1|teacher2|ode|dmd|fastdec|switch|vq|ship) $s ;;
        eval) evaluate ;;
        dmd+switch+fastdec) { dmd && switch; } & a=$!; fastdec & b=$!; wait $a; wait $b ;;
        vq+eval) vq & a=$!; evaluate & b=$!; wait $a; wait $b ;;
        *) echo "unknown stage $s (vae1 vae2 vae3 teacher1 teacher2 ode dmd fastdec switch vq eval ship)" >&2; exit 2 ;;
    esac
done
