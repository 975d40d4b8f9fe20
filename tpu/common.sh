# Shared helpers for the tpu/ scripts (sourced, not run).
# shellcheck shell=bash

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY_RUN=0

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Print the command (shell-quoted) with --dry-run, else run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Value of a top-level scalar field of tpu/configs/TOPOLOGY.json.
config_field() {
  local topology="$1" field="$2" file
  file="$TPU_DIR/configs/$topology.json"
  if [[ ! -f "$file" ]]; then
    local valid="" f
    for f in "$TPU_DIR"/configs/v5litepod-*.json; do valid+=" $(basename "$f" .json)"; done
    die "unknown topology '$topology': no $file (valid:$valid)"
  fi
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$file" "$field"
}
