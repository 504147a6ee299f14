#!/usr/bin/env bash
# Makes a local STAND-IN for docker.io/library/python:3.11-slim where no registry can be reached:
# Debian bookworm (minbase) from the apt mirror this machine already uses, with bookworm's own
# Python 3.11, imported into podman's store under the official name so that docker/Dockerfile's
# `FROM python:3.11-slim` builds with `--pull=never`. It is NOT the official image (Python lives in
# /usr/bin, not /usr/local/bin; Debian's 3.11.2, not the latest 3.11): use it for tests here only.
# Does nothing when the tag already exists (the cache between runs); FORCE=1 rebuilds it.
set -euo pipefail

TAG="docker.io/library/python:3.11-slim"
ROOTFS=""

apt_mirror() {
    # The Debian mirror apt is configured with: deb822 `URIs:` first, then one-line `deb` entries.
    local uri
    uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$uri" ] || { echo "container_base: no Debian mirror in /etc/apt/sources.list{,.d}; set MIRROR" >&2; exit 2; }
    echo "$uri"
}

main() {
    if [ "${FORCE:-0}" != 1 ] && podman image exists "$TAG"; then
        echo "container_base: $TAG exists (local stand-in); FORCE=1 rebuilds it" >&2
        return 0
    fi
    command -v debootstrap >/dev/null || { echo "container_base: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
    local mirror
    mirror="${MIRROR:-$(apt_mirror)}"
    ROOTFS="$(mktemp -d /var/tmp/tokenfeed-rootfs.XXXXXX)"
    trap 'rm -rf "$ROOTFS"' EXIT
    # Python goes in here, so neither this step nor the image build needs a network inside a container.
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$ROOTFS" "$mirror" >&2
    # What python:3.11-slim offers that Debian's python3 does not: `pip install` as root, `python`.
    rm -f "$ROOTFS"/usr/lib/python3.*/EXTERNALLY-MANAGED
    ln -sf python3 "$ROOTFS/usr/bin/python"
    [ -e "$ROOTFS/usr/bin/pip" ] || ln -sf pip3 "$ROOTFS/usr/bin/pip"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" --numeric-owner -c . | podman import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "local stand-in for python:3.11-slim (debootstrap bookworm minbase + python3)" - "$TAG" >&2
    echo "container_base: built $TAG (a stand-in, not the official image)" >&2
}

main "$@"
