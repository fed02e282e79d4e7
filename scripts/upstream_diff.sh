#!/usr/bin/env bash
# run_glue.py as a diff against the HF file it forks, at the tag its header names: the commit the tag points at,
# then `diff -u` (HF's file first). Needs a clone of huggingface/transformers (or the file itself).
#
#   bash scripts/upstream_diff.sh path/to/transformers        # a git clone that has the tag
#   bash scripts/upstream_diff.sh path/to/run_glue.py          # HF's file, taken at that tag
set -euo pipefail
cd "$(dirname "$0")/.."
UPSTREAM_PATH=examples/pytorch/text-classification/run_glue.py
tag=$(sed -n 's/^# Forks transformers \(v[0-9][0-9.]*\):.*/\1/p' run_glue.py)
[ -n "$tag" ] || { echo "upstream_diff: run_glue.py's header names no 'Forks transformers vX.Y.Z:' line" >&2; exit 2; }
source=${1:?usage: bash scripts/upstream_diff.sh <transformers clone | HF run_glue.py>}
upstream=$(mktemp)
trap 'rm -f "$upstream"' EXIT
if [ -d "$source" ]; then
  commit=$(git -C "$source" rev-parse --verify --quiet "$tag^{commit}") || {
    echo "upstream_diff: $source has no tag $tag (git -C $source fetch --tags)" >&2; exit 2; }
  git -C "$source" show "$commit:$UPSTREAM_PATH" > "$upstream"
  echo "transformers $tag is commit $commit"
elif [ -f "$source" ]; then
  cp "$source" "$upstream"
  echo "transformers $tag: $source"
else
  echo "upstream_diff: $source is neither a transformers clone nor a file" >&2; exit 2
fi
diff -u --label "transformers $tag $UPSTREAM_PATH" --label run_glue.py "$upstream" run_glue.py || [ $? -eq 1 ]
