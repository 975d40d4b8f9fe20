#!/usr/bin/env bash
# Install the package and start `embeddinggemma-jax embed` on EVERY worker of a TPU slice.
# Rerun the same command after a preemption or crash: the job resumes from its finished shards.
#
#   tpu/launch.sh --name NAME --zone ZONE --topology v5litepod-16 --input 'gs://b/in/*.jsonl' \
#       --output gs://b/out [--project P] [--install [--package WHEEL_OR_URL]] [--detach] [--dry-run] [-- EMBED ARGS]
# --install builds a wheel from this checkout, copies it to every worker and installs it with the tpu
# and gcs extras (jax[tpu] at the tested JAX version); --package installs a wheel file or URL instead.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

NAME="" ZONE="" TOPOLOGY="" PROJECT="" INPUT="" OUTPUT="" INSTALL=0 DETACH=0
PACKAGE=""
EMBED_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --topology) TOPOLOGY="${2:?--topology needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --input) INPUT="${2:?--input needs a value}"; shift 2 ;;
    --output) OUTPUT="${2:?--output needs a value}"; shift 2 ;;
    --package) PACKAGE="${2:?--package needs a value}"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EMBED_EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; embed options go after --)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$TOPOLOGY" ]] || die "--topology is required (v5litepod-1 ... v5litepod-256)"
[[ -n "$INPUT" ]] || die "--input is required (files or a quoted glob the workers expand, e.g. 'gs://b/in/*.jsonl')"
[[ -n "$OUTPUT" ]] || die "--output is required; it must be shared by all workers (a gs:// folder) on multi-host slices"
HOSTS="$(config_field "$TOPOLOGY" hosts)"
if [[ "$HOSTS" -gt 1 && "$OUTPUT" != gs://* ]]; then
  die "$TOPOLOGY has $HOSTS hosts: --output must be a gs:// folder every worker can see, got '$OUTPUT'"
fi

SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && SSH+=("--project=$PROJECT")

if [[ "$INSTALL" == 1 ]]; then
  EXTRAS="[tpu,gcs]"
  if [[ -z "$PACKAGE" ]]; then
    # A wheel of exactly this checkout; never a package of this name from an index.
    ROOT="$(cd "$TPU_DIR/.." && pwd)"
    VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/embeddinggemma_jax/version.py")"
    [[ -n "$VERSION" ]] || die "cannot read the version from $ROOT/embeddinggemma_jax/version.py"
    WHEEL="embeddinggemma_jax-$VERSION-py3-none-any.whl"
    DIST="$ROOT/dist"
    run python3 -m pip wheel --no-deps --no-build-isolation -w "$DIST" "$ROOT"
    SCP=(gcloud compute tpus tpu-vm scp "$DIST/$WHEEL" "$NAME:$WHEEL" --zone="$ZONE" --worker=all)
    [[ -n "$PROJECT" ]] && SCP+=("--project=$PROJECT")
    run "${SCP[@]}"
    PACKAGE="./$WHEEL"
  elif [[ "$PACKAGE" != *://* && "$PACKAGE" != *.whl ]]; then
    die "--package must be a wheel file or a URL of this project, got '$PACKAGE' (a bare name would install whatever an index has under it)"
  fi
  run "${SSH[@]}" --command="pip install -U $(printf '%q' "$PACKAGE$EXTRAS")"
fi

# The embed command as each worker runs it; globs in --input are expanded by the job itself
# (etils.epath, so gs://bucket/dir/*.jsonl works), hence quoted here.
read -r -a INPUTS <<< "$INPUT"
EMBED="embeddinggemma-jax embed --topology $(printf '%q' "$TOPOLOGY") --input"
for a in "${INPUTS[@]}"; do EMBED+=" $(printf '%q' "$a")"; done
EMBED+=" --output $(printf '%q' "$OUTPUT") --no-progress"
[[ "$HOSTS" -gt 1 ]] && EMBED+=" --multihost"
for a in "${EMBED_EXTRA[@]}"; do EMBED+=" $(printf '%q' "$a")"; done
if [[ "$DETACH" == 1 ]]; then
  REMOTE="nohup $EMBED > embed.log 2>&1 &"
else
  REMOTE="$EMBED 2>&1 | tee embed.log"
fi
run "${SSH[@]}" --command="$REMOTE"
