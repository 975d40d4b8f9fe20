#!/usr/bin/env bash
# Create a TPU v5e slice for the embedding job: a plain TPU VM, or a queued resource (--queued),
# which waits for capacity and is the usual way to get multi-host and spot slices.
#
#   tpu/create.sh --name NAME --zone ZONE --topology v5litepod-16 [--project P] [--queued] [--spot] [--dry-run]
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

NAME="" ZONE="" TOPOLOGY="" PROJECT="" QUEUED=0 SPOT=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --topology) TOPOLOGY="${2:?--topology needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required (a zone with v5e, e.g. us-west4-a)"
[[ -n "$TOPOLOGY" ]] || die "--topology is required (v5litepod-1 ... v5litepod-256)"

ACCEL="$(config_field "$TOPOLOGY" accelerator_type)"
VERSION="$(config_field "$TOPOLOGY" runtime_version)"
EXTRA=()
[[ -n "$PROJECT" ]] && EXTRA+=("--project=$PROJECT")
[[ "$SPOT" == 1 ]] && EXTRA+=("--spot")

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME-qr" --node-id="$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${EXTRA[@]}"
  echo "# wait for ACTIVE: gcloud compute tpus queued-resources describe $NAME-qr --zone=$ZONE" >&2
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" \
    --version="$VERSION" "${EXTRA[@]}"
fi
