#!/bin/sh
# Builds a local `debian:bookworm-slim` base image with debootstrap + `docker import`, for machines
# that cannot reach an image registry (CI here). Machines that can pull don't need this: the
# Dockerfile's runtime stage is the registry's debian:bookworm-slim.
#
#   scripts/docker-base-image.sh          # only when the image is missing
#   scripts/docker-base-image.sh --force  # rebuild it
#
# Needs root, debootstrap and a reachable Debian mirror (the one apt already uses).
set -eu
IMAGE=debian:bookworm-slim
if [ "${1:-}" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE exists (pass --force to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
}
# The mirror apt uses on this machine (deb822 or one-line sources).
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from $MIRROR (about a minute)"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "imported $IMAGE"
