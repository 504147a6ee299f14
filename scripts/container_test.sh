#!/usr/bin/env bash
# Builds the data server's image with podman, air-gapped (wheels built on the host, --no-index in the
# build, a local stand-in base image), runs it with podman-compose and checks it from outside: the
# HEALTHCHECK, /metrics, a real client streaming over TLS with a bearer token through the published
# port, the mounted config and corpus, a non-root user, a writable cache volume, and SIGTERM exiting 0
# within the grace period. Run by tests/test_container.py; needs root, podman, podman-compose, runc and
# debootstrap (see ../shared/notes/containers.md). Prints `figures: {json}` as its last line.
#
# Environment: PYTHON (default: .venv/bin/python), KEEP_BASE=0 also removes the stand-in base image
# (kept by default: it is the cache that makes the next run take seconds instead of a minute).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
PROJECT="tokenfeed-ct-$$"
IMAGE="localhost/tokenfeed/data-server:ct-$$"
GRACE_S=15           # compose's stop_grace_period; podman-compose does not apply it, so `podman stop -t`
COMPOSE_TIMEOUT=180  # podman-compose can hang on a stuck podman call: never wait for it unbounded
WORK="$(mktemp -d /var/tmp/tokenfeed-ct.XXXXXX)"
CID=""
HOLDER=""

log() { echo "container_test: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

compose() {
    timeout "$COMPOSE_TIMEOUT" podman-compose -p "$PROJECT" -f "$ROOT/compose.yaml" "$@"
}

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ] && [ -n "$CID" ]; then
        log "container log (last 40 lines):"; podman logs "$CID" 2>&1 | tail -n 40 >&2
    fi
    [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null
    [ -n "$CID" ] && podman rm -f "$CID" >/dev/null 2>&1
    compose down >/dev/null 2>&1
    podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null
    podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null
    podman image exists "$IMAGE" && podman rmi -f "$(podman image inspect --format '{{.Id}}' "$IMAGE")" >/dev/null
    if [ "${KEEP_BASE:-1}" = 0 ]; then podman rmi -f docker.io/library/python:3.11-slim >/dev/null 2>&1; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

require_tools() {
    local tool
    for tool in podman podman-compose runc debootstrap timeout; do
        command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install -y podman podman-compose runc debootstrap"
    done
    [ "$(id -u)" = 0 ] || fail "needs root (rootful podman; rootless needs subuid ranges this machine lacks)"
    [ -x "$PYTHON" ] || fail "no Python at $PYTHON (set PYTHON, or link the project's .venv)"
}

containers_conf() {
    # podman's default ulimits fail here ("setrlimit RLIMIT_NOFILE"); crun fails on hybrid cgroups: runc works.
    cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF="$WORK/containers.conf"
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

build_image() {
    "$ROOT/scripts/container_base.sh"
    local start
    start="$(now)"
    # Built into docker/wheelhouse (ignored by git): the only packages the image build may install.
    find "$ROOT/docker/wheelhouse" -name 'tokenfeed-*.whl' -delete
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$ROOT/docker/wheelhouse" \
        "$ROOT[server]" setuptools wheel >&2
    find "$ROOT/docker/wheelhouse" -name 'tokenfeed-*.whl' -delete  # the image builds its own from source
    WHEELS_S="$(since "$start")"
    log "wheelhouse: pip wheel '.[server]' on the host in ${WHEELS_S}s"
    start="$(now)"
    # --network=none: proof that the build is air-gapped. --format docker keeps the HEALTHCHECK.
    # --layers=false: no intermediate images (the wheel stage) left behind, so cleanup is one image by id.
    (cd "$ROOT" && podman build --pull=never --format docker --network=none --layers=false --build-arg OFFLINE=1 \
        --ignorefile docker/Dockerfile.dockerignore -f docker/Dockerfile -t "$IMAGE" . >&2)
    BUILD_S="$(since "$start")"
    IMAGE_MB="$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }')"
    log "built $IMAGE in ${BUILD_S}s, ${IMAGE_MB} MB"
}

start_service() {
    GRPC_PORT="$(free_port)"; METRICS_PORT="$(free_port)"
    "$PYTHON" "$ROOT/scripts/container_check.py" fixtures "$WORK/mount"
    export TOKENFEED_IMAGE="$IMAGE" TOKENFEED_GRPC_HOST_PORT="$GRPC_PORT" TOKENFEED_METRICS_HOST_PORT="$METRICS_PORT" \
        TOKENFEED_CONFIG_DIR="$WORK/mount/config" TOKENFEED_DATA_DIR="$WORK/mount/data" \
        TOKENFEED_HEALTH_ARGS="--tls-ca /config/tls/ca.pem"
    STARTED="$(now)"
    # podman-compose 1.0.3 exits 0 even when the container fails: its state is checked below instead.
    compose up -d --no-build data-server >&2 || fail "podman-compose up exited $?"
    CID="$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=data-server")"
    [ -n "$CID" ] || fail "podman-compose up started no data-server container"
    [ "$(podman inspect --format '{{.State.Status}}' "$CID")" = running ] || fail "the container is not running"
}

wait_healthy() {
    # No systemd here, so podman does not run the HEALTHCHECK on its timer: run it until it passes.
    local deadline=$((SECONDS + 90))
    until podman healthcheck run "$CID" >/dev/null 2>&1; do
        [ "$(podman inspect --format '{{.State.Status}}' "$CID")" = running ] || fail "the container exited"
        [ "$SECONDS" -lt "$deadline" ] || fail "not healthy within 90 s"
        sleep 1
    done
    HEALTHY_S="$(since "$STARTED")"
    [ "$(podman inspect --format '{{.State.Health.Status}}' "$CID")" = healthy ] || fail "health status not healthy"
    grep -q 'data-server health' <<<"$(podman inspect --format '{{.Config.Healthcheck.Test}}' "$CID")" \
        || fail "the container has no data-server HEALTHCHECK"
    log "healthy ${HEALTHY_S}s after podman-compose up"
}

check_inside() {
    local uid
    uid="$(podman exec "$CID" id -u)"
    [ "$uid" != 0 ] || fail "the server runs as root"
    podman exec "$CID" sh -c 'echo ok > /cache/probe && rm /cache/probe' || fail "/cache is not writable"
    podman exec "$CID" test -d /cache/shards || fail "the disk cache tier (/cache/shards) was not created"
    grep -qw /cache <<<"$(podman inspect --format '{{range .Mounts}}{{.Destination}} {{end}}' "$CID")" \
        || fail "/cache is not a volume"
    # Whole logs in a variable: `podman logs | grep -q` fails under pipefail when grep stops reading early.
    grep -q "serving /config/server.yaml" <<<"$(podman logs "$CID" 2>&1)" || fail "the mounted config was not served"
    log "uid $uid, /cache writable (a volume), mounted /config/server.yaml served"
}

check_outside() {
    "$PYTHON" "$ROOT/scripts/container_check.py" stream "$WORK/mount" "$GRPC_PORT" >&2
    "$PYTHON" "$ROOT/scripts/container_check.py" metrics "$WORK/mount" "$METRICS_PORT" >&2
}

open_stream() {
    # A client holding a stream open: SIGTERM must drain it (server.shutdown_grace_s), not hang on it.
    # Its stdin is a fifo this shell keeps open; closing it (or the exit trap's kill) ends the client.
    mkfifo "$WORK/hold.in"
    "$PYTHON" "$ROOT/scripts/container_check.py" hold "$WORK/mount" "$GRPC_PORT" \
        <"$WORK/hold.in" >"$WORK/hold.out" 2>&1 &
    HOLDER=$!
    exec 3>"$WORK/hold.in"
    local deadline=$((SECONDS + 30))
    until grep -q '^streaming' "$WORK/hold.out"; do
        kill -0 "$HOLDER" 2>/dev/null || fail "the holding client exited: $(cat "$WORK/hold.out")"
        [ "$SECONDS" -lt "$deadline" ] || fail "the holding client got no batch within 30 s"
        sleep 0.2
    done
}

stop_gracefully() {
    local start code
    open_stream
    start="$(now)"
    podman stop -t "$GRACE_S" "$CID" >/dev/null
    STOP_S="$(since "$start")"
    exec 3>&-
    wait "$HOLDER" || true  # the client's own outcome does not matter here: it lost its server
    HOLDER=""
    code="$(podman inspect --format '{{.State.ExitCode}}' "$CID")"
    [ "$code" = 0 ] || fail "SIGTERM: exit code $code, not 0"
    awk -v s="$STOP_S" -v g="$GRACE_S" 'BEGIN { exit !(s < g) }' || fail "stop took ${STOP_S}s: killed after the grace"
    local logs
    logs="$(podman logs "$CID" 2>&1)"
    grep -q "shutting down: health NOT_SERVING" <<<"$logs" || fail "SIGTERM did not start the shutdown"
    grep "drained" <<<"$logs" >&2 || true
    log "SIGTERM with a stream open: exit 0 after ${STOP_S}s (grace ${GRACE_S}s)"
}

main() {
    local start
    start="$(now)"
    require_tools
    containers_conf
    build_image
    start_service
    wait_healthy
    check_inside
    check_outside
    stop_gracefully
    printf 'figures: {"wheels_s": %s, "build_s": %s, "image_mb": %s, "healthy_s": %s, "stop_s": %s, "total_s": %s}\n' \
        "$WHEELS_S" "$BUILD_S" "$IMAGE_MB" "$HEALTHY_S" "$STOP_S" "$(since "$start")"
}

main "$@"
