#!/usr/bin/env bash
# Makes the base image `debian:bookworm-slim` when it is absent and cannot be pulled (a
# machine with a Debian package mirror but no Docker Hub, such as CI): debootstrap a
# minimal bookworm into a temp dir and `docker import` it. Does nothing when the image is
# already there or a pull works. Needs root (debootstrap) and the debootstrap package.
#
#   docker/base-image.sh                 # mirror from /etc/apt/sources.list*, else deb.debian.org
#   DEBIAN_MIRROR=http://mirror.example/debian docker/base-image.sh
#
# The imported image is close to Docker Hub's: minbase (essential packages + apt), apt
# lists and caches emptied, the same default command. It is not byte-identical, and it
# carries no `slim` path excludes (man pages and docs stay): a little larger, same behaviour.
set -euo pipefail

image="${BASE_IMAGE:-debian:bookworm-slim}"
suite=bookworm

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base-image: $image present"
    exit 0
fi
if timeout 60 docker pull "$image" >/dev/null 2>&1; then
    echo "base-image: pulled $image"
    exit 0
fi

# The mirror the host's apt uses for Debian itself (deb822 `URIs:` or one-line `deb`).
host_mirror() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null \
        | grep -Eo '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]+' \
        | grep -Eo '[a-z]+://[^[:space:]]+' \
        | grep -E '/debian/?$' | head -n 1
}
mirror="${DEBIAN_MIRROR:-$(host_mirror || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"

if [ "$(id -u)" -ne 0 ]; then
    echo "base-image: $image is absent and cannot be pulled; building it needs root (debootstrap)" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "base-image: $image is absent and cannot be pulled; install debootstrap (apt-get install debootstrap)" >&2
    exit 1
}

root="$(mktemp -d /tmp/shardgate-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "base-image: $image cannot be pulled; debootstrap $suite from $mirror"
start=$SECONDS
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# What Docker Hub's image also leaves out: package caches and lists (`apt-get update`
# first, as in any Dockerfile), and a sources file naming the mirror used here.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
echo "deb $mirror $suite main" >"$root/etc/apt/sources.list"
tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$image" >/dev/null
echo "base-image: imported $image ($((SECONDS - start)) s)"
