#!/usr/bin/env bash
# The published M-FAC run: bert-mini fine-tuned on SST-2 (Frantar, Kurtic, Alistarh 2021: 84.74 accuracy at
# seed 1234; 84.20 ± 0.58 over 5 seeds). Settings are the published ones; these environment variables override
# what a user without the Hub, or with other paths, must change:
#   MODEL            model id or local folder        (default prajjwal1/bert-mini)
#   SEED             random seed                     (default 1234)
#   OUTPUT_DIR       run folder                      (default out_dir/)
#   TRAIN_FILE       local SST-2 train (.tsv/.csv/.json), with VALIDATION_FILE; default: GLUE from the Hub
#   VALIDATION_FILE  local SST-2 dev
# Model and GLUE already in the Hugging Face cache (HF_HOME) need no Hub: with HF_HUB_OFFLINE=1 (a cluster's
# compute nodes), or whenever the Hub cannot be reached, the run reads them from the cache.
# Extra arguments go last to run_glue.py, so they override (e.g. --max_steps 4); an extra --optim_args overrides
# only the keys it names (e.g. --optim_args '{"grad_dtype": "bfloat16"}' keeps lr, num_grads and damp). Uses the
# `python` on PATH. Usage errors exit with status 2.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "reproduce_sst2_bert_mini: $*" >&2; exit 2; }

MODEL=${MODEL:-prajjwal1/bert-mini}
SEED=${SEED:-1234}
OUTPUT_DIR=${OUTPUT_DIR:-out_dir/}
data=()
if [ -n "${TRAIN_FILE:-}${VALIDATION_FILE:-}" ]; then
  [ -n "${TRAIN_FILE:-}" ] && [ -n "${VALIDATION_FILE:-}" ] || die "set both TRAIN_FILE and VALIDATION_FILE, or neither (GLUE from the Hub)"
  for file in "$TRAIN_FILE" "$VALIDATION_FILE"; do [ -f "$file" ] || die "data file not found: $file"; done
  data=(--train_file "$TRAIN_FILE" --validation_file "$VALIDATION_FILE")
fi
command -v python >/dev/null || die "no python on PATH (activate the project's venv: . .venv/bin/activate)"

# Fail in seconds, with what to set, rather than deep inside a download. What the Hugging Face cache (HF_HOME)
# already holds needs no Hub: with HF_HUB_OFFLINE=1, or when the Hub cannot be reached, the run uses the cache.
hub=$(python - "$MODEL" "${#data[@]}" <<'PY'
import glob, os, sys
from huggingface_hub import HfApi, constants, try_to_load_from_cache
import datasets.config

model, hub_data = sys.argv[1], sys.argv[2] == "0"
if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(model):
    print(f"reproduce_sst2_bert_mini: MODEL folder not found: {model}", file=sys.stderr)
    sys.exit(2)
needed = []  # (kind, Hub name, whether the cache holds it)
if not os.path.isdir(model):
    needed.append(("model", model, isinstance(try_to_load_from_cache(model, "config.json"), str)))
if hub_data:
    prepared = os.path.join(datasets.config.HF_DATASETS_CACHE, "nyu-mll___glue", "sst2", "*", "*", "dataset_info.json")
    needed.append(("dataset", "nyu-mll/glue", bool(glob.glob(prepared))))
missing = [(kind, name) for kind, name, cached in needed if not cached]
offline_mode = constants.HF_HUB_OFFLINE
reachable = False
if needed and not offline_mode:
    try:
        for kind, name, _ in needed:
            getattr(HfApi(), f"{kind}_info")(name, timeout=10)
        reachable = True
    except Exception:
        pass
if missing and not reachable:
    kind, name = missing[0]
    why = "HF_HUB_OFFLINE=1" if offline_mode else "the Hugging Face Hub cannot be reached"
    print(f"reproduce_sst2_bert_mini: {kind} {name!r} is not in the cache ({constants.HF_HOME}) and {why}: fill "
          "the cache where the Hub is reachable (see README), or set MODEL=/path/to/model and "
          "TRAIN_FILE/VALIDATION_FILE to SST-2's train.tsv/dev.tsv.", file=sys.stderr)
    sys.exit(2)
print("online" if reachable or not needed else "offline")
PY
) || exit $?
if [ "$hub" = offline ]; then
  echo "reproduce_sst2_bert_mini: running from the Hugging Face cache, without the Hub" >&2
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi

# The published M-FAC arguments, with the keys of any --optim_args among the extra arguments put over them.
optim_args='{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}'
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --optim_args|--optim-args)
      [ $# -ge 2 ] || die "--optim_args: needs a JSON object"
      given=$2; shift 2 ;;
    --optim_args=*|--optim-args=*) given=${1#*=}; shift ;;
    *) extra+=("$1"); shift; continue ;;
  esac
  optim_args=$(python -c 'import json, sys
try:
    given = json.loads(sys.argv[2])
except ValueError as error:
    sys.exit(f"reproduce_sst2_bert_mini: --optim_args: not a JSON object ({error}): {sys.argv[2]}")
if not isinstance(given, dict):
    sys.exit(f"reproduce_sst2_bert_mini: --optim_args: not a JSON object: {sys.argv[2]}")
print(json.dumps({**json.loads(sys.argv[1]), **given}))' "$optim_args" "$given") || exit 2
done

exec python run_glue.py --seed "$SEED" --model_name_or_path "$MODEL" --task_name sst2 --do_train --do_eval \
  --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 3 \
  --output_dir "$OUTPUT_DIR" --optim MFAC --optim_args "$optim_args" \
  ${data[@]+"${data[@]}"} ${extra[@]+"${extra[@]}"}
