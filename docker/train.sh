#!/bin/sh
# One-shot training job (trainer image): a new, timestamped artifact version in $TRAIN_ROOT,
# published atomically. The mode is what `--mode auto` picks from the data (labels or not); the
# hyperparameters are the named preset's (model/presets.py), never numbers here. Extra arguments
# go to `jointpq train` (e.g. --mode distill --queries /data/queries.txt, or --m 48).
set -eu
version="${TRAIN_NAME}-$(date -u +%Y%m%d-%H%M%S)"
exec jointpq train --preset trainer-image --data "${TRAIN_DATA}" --out "${TRAIN_ROOT}/${version}" --publish "$@"
