#!/bin/sh
# One-shot training job (trainer image): a new, timestamped artifact version in $TRAIN_ROOT,
# published atomically. Extra arguments go to `jointpq train` (e.g. --m 48 --epochs 20).
set -eu
version="${TRAIN_NAME}-$(date -u +%Y%m%d-%H%M%S)"
exec jointpq train --mode poeem --encoder minilm-head --separate-towers \
  --data "${TRAIN_DATA}" --out "${TRAIN_ROOT}/${version}" --m 16 --nlist 32 --lr 1e-3 --publish "$@"
