#!/usr/bin/env bash
# Build a Debian base image locally, with no registry: debootstrap a minimal Debian
# (python3, its venv module, CA certificates) and import it into Docker Engine or podman.
# The project's images then build FROM it through their BASE_IMAGE argument, and the
# air-gapped compose override installs Redis, the exporter and Prometheus on it.
#
#   deploy/docker/debian-base.sh [IMAGE]        (default localhost/maskstream-debian:bookworm)
#
# Needs root and debootstrap. An image of that name younger than $BASE_MAX_AGE_DAYS (14) is
# kept. The root file system is cached as a tarball in $BASE_CACHE_DIR (build/containers,
# gitignored) and reused while it is that young, so a later run only imports it. FORCE=1
# debootstraps anew. The tarball does not depend on the engine: a second engine imports the
# same one. Environment:
#   DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
#   ENGINE (docker or podman; default: the engine deploy/docker/compose.sh picks)
# CA certificates the host added to /usr/local/share/ca-certificates (a proxy's, say) are
# trusted inside the image too, so pip and apt-get in later builds see what the host sees.
set -euo pipefail

image=${1:-localhost/maskstream-debian:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root_dir=$(cd "$(dirname "$0")/../.." && pwd)
engine=${ENGINE:-$("$root_dir/deploy/docker/compose.sh" --engine)}
case "$engine" in
docker | podman) ;;
*) echo "debian-base.sh: ENGINE must be docker or podman, not '$engine'" >&2; exit 2 ;;
esac
cache_dir=${BASE_CACHE_DIR:-$root_dir/build/containers}
tarball=$cache_dir/debian-$suite-minbase.tar
max_age=${BASE_MAX_AGE_DAYS:-14}

if [ "$(id -u)" -ne 0 ]; then
    echo "debian-base.sh: debootstrap needs root (run it with sudo)" >&2
    exit 1
fi
mkdir -p "$cache_dir"

# When the image was made, in seconds since the epoch; fails when there is no such image.
# podman's .Created is a time, Docker's an RFC 3339 string.
image_created() {
    if [ "$engine" = podman ]; then
        podman image inspect --format '{{.Created.Unix}}' "$image" 2>/dev/null
    else
        local when
        when=$(docker image inspect --format '{{.Created}}' "$image" 2>/dev/null) &&
            date -d "$when" +%s
    fi
}

# Already imported and young enough (a CI run in a fresh clone has no tarball cache, but
# the engine's image store outlives it): nothing to do. FORCE=1 makes a new one.
if [ -z "${FORCE:-}" ] && created=$(image_created) &&
    [ $(($(date +%s) - created)) -lt $((max_age * 86400)) ]; then
    echo "debian-base.sh: $image exists ($(((($(date +%s) - created)) / 3600)) h old), kept"
    exit 0
fi

if [ -z "${FORCE:-}" ] && [ -s "$tarball" ] && [ -n "$(find "$tarball" -mtime "-$max_age" 2>/dev/null)" ]; then
    echo "debian-base.sh: reusing $tarball"
else
    command -v debootstrap >/dev/null || {
        echo "debian-base.sh: debootstrap is missing: apt-get install debootstrap" >&2
        exit 1
    }
    work=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "debian-base.sh: debootstrap $suite from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$work/root" "$mirror" >"$cache_dir/debootstrap.log" 2>&1 || {
        tail -20 "$cache_dir/debootstrap.log" >&2
        exit 1
    }
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$work/root/usr/local/share/ca-certificates/"
        chroot "$work/root" update-ca-certificates >/dev/null 2>&1
    fi
    # Smaller image: no package cache, docs or locales.
    rm -rf "$work/root"/var/cache/apt/archives/*.deb "$work/root"/var/lib/apt/lists/* \
        "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/locale/*
    tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

# No --quiet: Docker's import has none. Both print the new image's id, which nobody needs.
"$engine" import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$image" >/dev/null
echo "debian-base.sh: imported $image into $engine ($(du -h "$tarball" | cut -f1) root file system)"
