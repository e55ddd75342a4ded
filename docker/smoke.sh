#!/usr/bin/env bash
# The compose stack, for real, from nothing: engine, local base images, wheelhouse, the four
# images, trainer -> 2 api replicas behind nginx -> search -> a second version hot-reloaded by both
# replicas -> locust in its container -> non-root and no-secret checks -> image sizes -> teardown.
# Exits non-zero naming the failing step. `make compose-smoke` runs it; CI runs it after the tests.
#
#   bash docker/smoke.sh              # hashed-encoder trainer (fast)
#   bash docker/smoke.sh --minilm     # the trainer image's default: MiniLM + heads (minutes)
#   SMOKE_KEEP=1 bash docker/smoke.sh # leave the stack up (then: docker-compose -p jointpq-smoke down -v)
#   SMOKE_PORT=18000                  # the host port nginx is published on (JOINTPQ_LB_PORT)
#
# Needs root and Debian's packages (it installs docker.io, docker-compose, debootstrap if absent and
# starts dockerd itself when none runs, stopping it at the end). No image registry is needed: the
# bases are built from Debian's packages (debootstrap + docker import), Python packages come from a
# wheelhouse downloaded beforehand (pip download). With a registry, `docker compose build` works as
# usual from the official bases.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MINILM=0
[[ "${1:-}" == "--minilm" ]] && MINILM=1
PROJECT=jointpq-smoke
PORT=${SMOKE_PORT:-18000}
MIRROR=${SMOKE_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PY_BASE=jointpq-base/python:3.11-bookworm
NGINX_BASE=jointpq-base/nginx:bookworm
LOCUST_BASE=jointpq-base/locust:2.47.0
WORK=$(mktemp -d /tmp/jointpq-smoke.XXXXXX)
STEP="start"
STARTED_DOCKERD=""
T0=$(date +%s)
declare -a TIMES=()

step() {  # step NAME: announce and time the next step
  local now
  now=$(date +%s)
  [[ "$STEP" != "start" ]] && TIMES+=("$(printf '%-44s %4ss' "$STEP" $((now - STEP_T0)))")
  STEP="$1"
  STEP_T0=$now
  echo "== smoke: $STEP"
}

compose() {
  JOINTPQ_PYTHON_IMAGE=$PY_BASE JOINTPQ_NGINX_IMAGE=$NGINX_BASE JOINTPQ_LOCUST_IMAGE=$LOCUST_BASE \
    JOINTPQ_ADMIN_TOKEN=${TOKEN:-} JOINTPQ_LB_PORT=$PORT docker-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"
}

teardown() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "FAILED at step: $STEP (exit $rc)" >&2
    compose --profile train --profile loadtest logs --tail 40 >&2 2>/dev/null || true
  fi
  if [[ -z "${SMOKE_KEEP:-}" ]] && command -v docker-compose >/dev/null && docker info >/dev/null 2>&1; then
    compose --profile train --profile loadtest down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [[ -n "$STARTED_DOCKERD" && -z "${SMOKE_KEEP:-}" ]]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  rm -rf "$WORK"
  exit $rc
}
trap teardown EXIT

step "check the machine (root, Debian packages)"
if [[ $(id -u) -ne 0 ]]; then
  echo "docker/smoke.sh needs root (it installs and starts the Docker engine)" >&2
  exit 1
fi
need=()
command -v dockerd >/dev/null || need+=(docker.io containerd runc tini iptables)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [[ ${#need[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || { echo "no apt-get: install ${need[*]} yourself" >&2; exit 1; }
  echo "installing ${need[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

step "start the Docker engine"
if ! docker info >/dev/null 2>&1; then
  echo "no Docker engine running: starting dockerd (stopped again at the end)"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; exit 1; }
fi
# containers on the compose network must reach each other even when iptables is off or restrictive
iptables -P FORWARD ACCEPT 2>/dev/null || true

step "local base images (debootstrap + docker import)"
make_base() {  # make_base IMAGE PACKAGES CMD
  local image=$1 packages=$2 cmd=$3 dir="$WORK/rootfs-${1//[:\/]/-}"
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image: present"
    return
  fi
  debootstrap --variant=minbase --include="$packages" bookworm "$dir" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | docker import -c 'ENV LANG=C.UTF-8' -c "CMD $cmd" - "$image" >/dev/null
  rm -rf "$dir"
  echo "$image: built from Debian bookworm ($packages)"
}
make_base "$PY_BASE" python3,python3-venv,passwd,ca-certificates '["python3"]'
make_base "$NGINX_BASE" nginx-light '["nginx", "-g", "daemon off;"]'

step "wheelhouse (pip download)"
PIP=${SMOKE_PIP:-$ROOT/.venv/bin/pip}
[[ -x "$PIP" ]] || PIP="python3 -m pip"
# the CPU torch wheel by its exact local version: from pip's configured sources when they have it
# (this machine's wheel folder, a company mirror), else from PyTorch's CPU index
if ! ls docker/wheelhouse/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  $PIP download -q --no-deps -d docker/wheelhouse "torch==2.13.0+cpu" 2>/dev/null \
    || $PIP download -q --no-deps -d docker/wheelhouse "torch==2.13.0+cpu" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
{ cat docker/constraints.txt; echo "torch==2.13.0+cpu"; } >"$WORK/constraints.txt"  # never another torch
$PIP download -q -d docker/wheelhouse --find-links docker/wheelhouse ".[faiss,minilm]" "locust==2.47.0" \
  -c "$WORK/constraints.txt" 2>&1 | grep -v "is ignored" || true
ls docker/wheelhouse/torch-2.13.0+cpu-*.whl >/dev/null || { echo "no CPU torch wheel in the wheelhouse" >&2; exit 1; }
if [[ -n $(find docker/wheelhouse -name 'nvidia_*.whl' -o -name 'triton-*.whl') ]]; then
  echo "CUDA wheels in the wheelhouse: a CUDA torch crept in" >&2
  exit 1
fi
echo "$(find docker/wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh docker/wheelhouse | cut -f1)"

step "locust base image (local Python base + wheelhouse)"
docker build -q -f docker/bases/Dockerfile.locust --build-arg PYTHON_IMAGE=$PY_BASE -t "$LOCUST_BASE" . >/dev/null

step "build the service, trainer, nginx and locust images"
compose --profile train --profile loadtest build api trainer lb locust-master

TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
TRAIN_ARGS=(--encoder hashed --preset smoke)  # after the image's own --preset: the smoke preset wins
[[ $MINILM -eq 1 ]] && TRAIN_ARGS=()

step "train version 1 into the artifacts volume (trainer profile)"
compose --profile train run --rm -e TRAIN_NAME=smoke-a trainer "${TRAIN_ARGS[@]}"

step "2 api replicas behind nginx, healthy"
compose up -d --scale api=2 api lb
mapfile -t APIS < <(compose ps -q api)
[[ ${#APIS[@]} -eq 2 ]] || { echo "expected 2 api containers, got ${#APIS[@]}" >&2; exit 1; }
for _ in $(seq 1 90); do
  healthy=0
  for c in "${APIS[@]}"; do
    [[ $(docker inspect -f '{{.State.Health.Status}}' "$c") == healthy ]] && healthy=$((healthy + 1))
  done
  [[ $healthy -eq 2 ]] && break
  sleep 2
done
[[ $healthy -eq 2 ]] || { echo "replicas not healthy: $healthy of 2" >&2; exit 1; }

replica_version() {  # the version a replica serves, asked inside its container (not through nginx)
  docker exec "$1" python -c \
    "import json, urllib.request as u; print(json.load(u.urlopen('http://127.0.0.1:8000/info'))['artifact']['version'])"
}
V1=$(replica_version "${APIS[0]}")
echo "replicas serve $V1"

step "search through nginx"
for _ in $(seq 1 30); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
answer=$(curl -sf "http://127.0.0.1:$PORT/search" -H 'content-type: application/json' \
  -d '{"query": "Vitamin D deficiency is linked to lower bone mineral density.", "k": 5}')
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); ids = r["results"][0]["ids"]; assert len(ids) == 5, r; print("top-5:", ids, "from", r["version"])' "$answer"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/search" -H 'content-type: application/json' -d '{"k": 5}')
[[ $code == 422 ]] || { echo "a bad body through nginx answered $code, expected 422" >&2; exit 1; }

step "train + publish version 2, both replicas swap to it"
compose --profile train run --rm -e TRAIN_NAME=smoke-b trainer "${TRAIN_ARGS[@]}" --seed 1
for _ in $(seq 1 60); do
  a=$(replica_version "${APIS[0]}")
  b=$(replica_version "${APIS[1]}")
  [[ $a != "$V1" && $a == "$b" ]] && break
  sleep 2
done
[[ $a != "$V1" && $a == "$b" ]] || { echo "replicas serve $a and $b, expected both to leave $V1" >&2; exit 1; }
echo "both replicas serve $a (was $V1)"

step "locust headless in its container against nginx (20 s)"
compose --profile loadtest run --rm --no-deps locust-master --headless -u 8 -r 8 -t 20s \
  --host http://lb:8080 --only-summary --exit-code-on-error 1 2>&1 | tail -15

step "non-root containers, no secret in the images"
for c in "${APIS[@]}"; do
  uid=$(docker exec "$c" id -u)
  [[ $uid != 0 ]] || { echo "api container $c runs as root" >&2; exit 1; }
done
for image in jointpq:cpu jointpq:train; do
  uid=$(docker run --rm --entrypoint id "$image" -u)
  [[ $uid != 0 ]] || { echo "$image runs as root" >&2; exit 1; }
  if docker history --no-trunc "$image" | grep -qi -e "$TOKEN" -e "ADMIN_TOKEN="; then
    echo "$image: a secret in its history" >&2
    exit 1
  fi
done
echo "api replicas and images run as uid $uid; no token in the image history"

step "image sizes"
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^jointpq' | sort

step "tear down"
if [[ -z "${SMOKE_KEEP:-}" ]]; then
  compose --profile train --profile loadtest down -v --remove-orphans
fi
step "done"
echo
echo "smoke passed in $(($(date +%s) - T0)) s:"
printf '  %s\n' "${TIMES[@]}"
