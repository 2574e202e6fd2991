#!/usr/bin/env bash
# Build the deltamux CPU image with podman and check that it serves the demo store.
#
#   docker/smoke-test.sh        (or: make docker-smoke)
#
# The script builds the debian:bookworm-slim base image locally with debootstrap when podman does
# not have it. It fills docker/wheelhouse and builds the image offline from it. It starts a
# container with demo/store and the host's base folder mounted read-only and waits for /ready.
# Then it sends one chat completion per demo task through the openai client, runs the health
# check, stops the container with SIGTERM and requires exit code 0. Last, it starts containers
# with bad input (no store volume, a delta made for another base, no base volume) and requires a
# non-zero exit code and the expected error line in each log.
#
# Needs podman and runc, debootstrap for the first base image (as root), and the project's
# virtual environment on the host (`make venv`). Every server listens on 127.0.0.1 only. Build
# artefacts: the podman images and the wheels in docker/wheelhouse (ignored by git), which later
# runs reuse; the debootstrap folder is temporary.
#
# Environment:
#   DELTAMUX_IMAGE       image name (default localhost/deltamux:cpu)
#   DELTAMUX_BASE        the host's base folder to mount (default: `deltamux fetch-base`, which
#                        downloads and converts it once into ~/.cache/deltamux)
#   DEBIAN_MIRROR        the Debian mirror for debootstrap (default: the first one in apt's sources)
#   READY_TIMEOUT        seconds to wait for /ready (default 600)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

IMAGE="${DELTAMUX_IMAGE:-localhost/deltamux:cpu}"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DELTAMUX="${DELTAMUX:-$ROOT/.venv/bin/deltamux}"
WHEELHOUSE="$ROOT/docker/wheelhouse"
STORE="$ROOT/demo/store"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
OTHER_BASE="sha256:$(printf '0%.0s' {1..64})"

# crun fails on some hosts' cgroup setup and systemd may be absent, so use runc and cgroupfs.
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
# --network host: the server binds 127.0.0.1:PORT, which the host then reaches. The rlimits stay
# below common hard limits, because podman rejects a container asking for more than the host allows.
RUN_FLAGS=(--network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { echo "smoke-test: $*"; }
fail() {
  echo "smoke-test: FAILED: $*" >&2
  exit 1
}

SCRATCH="$(mktemp -d)"
CONTAINERS=()
cleanup() {
  local name
  for name in "${CONTAINERS[@]}"; do
    "${PODMAN[@]}" rm --force "$name" >/dev/null 2>&1 || true
  done
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

# Set CONTAINER to a new container name for LABEL and remember it for the cleanup.
# NOTE: call it directly, not in $(...), because a subshell's change to CONTAINERS is lost.
name_container() {
  CONTAINER="deltamux-smoke-$$-$1"
  CONTAINERS+=("$CONTAINER")
}

debian_mirror() {
  local uri
  uri="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)"
  if [[ -z "$uri" ]]; then
    uri="$(sed -n 's/^deb[[:space:]]\+\(http[^[:space:]]*debian\)[[:space:]].*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n 1)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# 1. The base image: Debian 12 made with debootstrap, under the name the Dockerfile's FROM uses.
build_base_image() {
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE present"
    return
  fi
  command -v debootstrap >/dev/null || fail "$BASE_IMAGE is missing and debootstrap is not installed (apt-get install debootstrap)"
  [[ "$(id -u)" == 0 ]] || fail "$BASE_IMAGE is missing and debootstrap needs root to build it; run as root or load the image into podman"
  local mirror rootfs="$SCRATCH/rootfs" started=$SECONDS
  mirror="${DEBIAN_MIRROR:-$(debian_mirror)}"
  log "building $BASE_IMAGE with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$SCRATCH/debootstrap.log" 2>&1 \
    || { tail -n 20 "$SCRATCH/debootstrap.log" >&2; fail "debootstrap from $mirror failed"; }
  # Like the published slim image: no downloaded packages and no apt lists.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "built $BASE_IMAGE in $((SECONDS - started)) s"
}

# 2. The wheelhouse: every wheel the image installs, torch as its CPU build.
fill_wheelhouse() {
  local started=$SECONDS
  log "filling $WHEELHOUSE"
  "$PYTHON" -m pip wheel --quiet --quiet --disable-pip-version-check --wheel-dir "$WHEELHOUSE" . 'setuptools>=77'
  # The image builds deltamux from the source tree, so its own wheel would only defeat the layer cache.
  rm -f "$WHEELHOUSE"/deltamux-*.whl
  compgen -G "$WHEELHOUSE/torch-*+cpu-*.whl" >/dev/null \
    || fail "$WHEELHOUSE has no CPU build of torch (torch-*+cpu-*.whl); pip resolved another build"
  if compgen -G "$WHEELHOUSE/nvidia_*.whl" >/dev/null; then
    fail "$WHEELHOUSE contains CUDA wheels (nvidia_*.whl); remove them and the CUDA torch wheel"
  fi
  log "filled $WHEELHOUSE in $((SECONDS - started)) s"
}

# 3. The image, offline from the wheelhouse. --format docker keeps the HEALTHCHECK.
build_image() {
  log "building $IMAGE"
  local started=$SECONDS
  "${PODMAN[@]}" build --isolation chroot --network host --format docker \
    --build-arg PIP_SOURCE=wheelhouse -f docker/Dockerfile -t "$IMAGE" . >"$SCRATCH/build.log" 2>&1 \
    || { tail -n 30 "$SCRATCH/build.log" >&2; fail "podman build failed"; }
  log "built $IMAGE in $((SECONDS - started)) s"
}

# Run `podman run RUN_FLAGS ARGS...`. Without systemd, podman cannot schedule the periodic health
# checks and logs an error for each container. The test runs the HEALTHCHECK itself with
# `podman healthcheck run`, so those lines are dropped.
podman_run() {
  "${PODMAN[@]}" run "${RUN_FLAGS[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2)
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Print the HTTP status of GET http://127.0.0.1:PORT/PATH, or 000 when nothing responds.
http_status() {
  local port="$1" path="$2" status
  status="$({
    exec 3<>"/dev/tcp/127.0.0.1/$port" \
      && printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3 \
      && head -n 1 <&3 | cut -d ' ' -f 2
  } 2>/dev/null)" || true
  echo "${status:-000}"
}

container_state() {
  "${PODMAN[@]}" inspect --format '{{.State.Status}}' "$1" 2>/dev/null || echo missing
}

# Wait for /ready to return 200; fail with the container log if it stops or the time runs out.
wait_ready() {
  local name="$1" port="$2" deadline=$((SECONDS + READY_TIMEOUT))
  while [[ "$(http_status "$port" /ready)" != 200 ]]; do
    if [[ "$(container_state "$name")" != running ]]; then
      "${PODMAN[@]}" logs "$name" >&2 || true
      fail "container $name stopped before /ready returned 200"
    fi
    if ((SECONDS >= deadline)); then
      "${PODMAN[@]}" logs "$name" >&2 || true
      fail "/ready did not return 200 within $READY_TIMEOUT s"
    fi
    sleep 0.5
  done
}

# Wait for a container to exit and print its exit code; fail if it is still running after 120 s.
wait_exit() {
  local name="$1" code
  code="$(timeout 120 "${PODMAN[@]}" wait "$name")" || fail "container $name did not exit within 120 s"
  echo "$code"
}

# 4. The demo store served end to end, then stopped with SIGTERM.
check_serving() {
  local base_dir="$1" name port started ready_ms user tasks code
  name_container serve
  name="$CONTAINER"
  port="$(free_port)"
  tasks="$(cd "$STORE" && ls -- *.delta.safetensors | sed 's/\.delta\.safetensors$//' | paste -sd, -)"

  started="$(date +%s%N)"
  podman_run --detach --name "$name" \
    --volume "$STORE:/data/store:ro" --volume "$base_dir:/data/base:ro" \
    --env DELTAMUX_BASE=/data/base --env DELTAMUX_HOST=127.0.0.1 --env "DELTAMUX_PORT=$port" \
    "$IMAGE" >/dev/null
  wait_ready "$name" "$port"
  ready_ms=$((($(date +%s%N) - started) / 1000000))
  log "cold start: container start to /ready in $ready_ms ms"

  user="$("${PODMAN[@]}" exec "$name" id -u)"
  [[ "$user" != 0 ]] || fail "the server runs as root inside the container"
  log "the server runs as uid $user"

  "$PYTHON" docker/smoke_check.py complete --url "http://127.0.0.1:$port/v1" --tasks "$tasks" \
    || fail "completions through the openai client failed"

  "${PODMAN[@]}" healthcheck run "$name" >/dev/null || fail "the health check of $name reports unhealthy"
  log "health check passed"

  "${PODMAN[@]}" kill --signal TERM "$name" >/dev/null
  code="$(wait_exit "$name")"
  if [[ "$code" != 0 ]]; then
    "${PODMAN[@]}" logs "$name" >&2 || true
    fail "the container exited with code $code after SIGTERM, expected 0"
  fi
  "${PODMAN[@]}" logs "$name" 2>&1 | grep -q "stopped after SIGTERM" \
    || fail "the container log has no 'stopped after SIGTERM' line"
  log "stopped by SIGTERM with exit code 0"
  COLD_START_MS=$ready_ms
}

# Start a container that must fail: require a non-zero exit code and TEXT in its log.
expect_failure() {
  local label="$1" text="$2" name code output
  shift 2
  name_container "$label"
  name="$CONTAINER"
  podman_run --detach --name "$name" --env DELTAMUX_HOST=127.0.0.1 \
    --env "DELTAMUX_PORT=$(free_port)" "$@" "$IMAGE" >/dev/null
  code="$(wait_exit "$name")"
  output="$("${PODMAN[@]}" logs "$name" 2>&1)"
  [[ "$code" != 0 ]] || fail "$label: the container exited with code 0, expected an error"
  grep -qF -- "$text" <<<"$output" || { echo "$output" >&2; fail "$label: the log does not contain '$text'"; }
  log "$label: exit code $code, log: $(grep -F -- "$text" <<<"$output" | head -n 1)"
}

# 5. Bad input: each must stop the start-up with a clear message.
check_bad_input() {
  local base_dir="$1" other_store="$SCRATCH/other-base-store"
  expect_failure no-store-volume "contains no delta files" \
    --volume "$base_dir:/data/base:ro" --env DELTAMUX_BASE=/data/base

  mkdir -p "$other_store"
  "$PYTHON" docker/smoke_check.py rebase-delta "$STORE/sentiment.delta.safetensors" \
    "$other_store/sentiment.delta.safetensors" --fingerprint "$OTHER_BASE" >/dev/null
  chmod -R a+rX "$other_store"
  expect_failure delta-for-other-base "was made for base '$OTHER_BASE'" \
    --volume "$other_store:/data/store:ro" --volume "$base_dir:/data/base:ro" --env DELTAMUX_BASE=/data/base

  expect_failure no-base-volume "base folder '/data/base' does not exist" \
    --volume "$STORE:/data/store:ro" --env DELTAMUX_BASE=/data/base
}

# 6. A lean final stage: no compilers, pip caches or wheelhouse.
check_lean_image() {
  local leftovers
  leftovers="$(podman_run --rm --user root --entrypoint /bin/sh "$IMAGE" -c \
    'for tool in gcc cc c++ make; do command -v "$tool"; done; ls -d /root/.cache/pip /home/deltamux/.cache/pip /wheels /src 2>/dev/null' || true)"
  [[ -z "$leftovers" ]] || fail "the final image contains build leftovers: $leftovers"
  IMAGE_BYTES="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
  log "image $IMAGE: $IMAGE_BYTES bytes, no compilers or pip caches"
}

main() {
  local started=$SECONDS base_dir
  command -v podman >/dev/null || fail "podman is not installed (apt-get install podman runc debootstrap)"
  [[ -x "$PYTHON" ]] || fail "$PYTHON does not exist; run 'make venv' first"

  build_base_image
  fill_wheelhouse
  build_image
  check_lean_image

  if [[ -n "${DELTAMUX_BASE:-}" ]]; then
    base_dir="$DELTAMUX_BASE"
  else
    base_dir="$("$DELTAMUX" fetch-base | tail -n 1 | cut -f 1)"
  fi
  [[ -d "$base_dir" ]] || fail "base folder '$base_dir' does not exist"
  log "base folder $base_dir"

  check_serving "$base_dir"
  check_bad_input "$base_dir"
  log "passed in $((SECONDS - started)) s: image $IMAGE_BYTES bytes, cold start $COLD_START_MS ms"
}

main "$@"
