#!/bin/sh
# Container entrypoint: serve /config/server.yaml when one is mounted, else the embedded stdlib corpus.
# Listening addresses come from the environment so that they match the ports the image exposes.
set -eu
config="${TOKENFEED_CONFIG:-/config/server.yaml}"
set -- --host "${TOKENFEED_HOST:-0.0.0.0}" --port "${TOKENFEED_PORT:-50051}" \
    --metrics-port "${TOKENFEED_METRICS_PORT:-9400}" "$@"
if [ -f "$config" ]; then
    set -- --config "$config" "$@"
    echo "tokenfeed: serving $config" >&2
else
    echo "tokenfeed: no $config mounted; serving the embedded stdlib corpus" >&2
fi
exec data-server serve "$@"
