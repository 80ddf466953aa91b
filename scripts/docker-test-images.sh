#!/usr/bin/env bash
# Builds the container images the Docker tests run, on an engine that starts with no images and
# can pull none (no registry is reachable): everything comes from the Debian mirror in the
# machine's apt sources and from PyPI, and is imported with `docker import`.
#
#   bash scripts/docker-test-images.sh [busybox|prefect|all]   (default: all)
#
# Prints one line per image: `<what> <tag>`. Tags are keyed by the content that makes the
# image (this script, and for Prefect the constraints file), so a changed pin builds a new
# image; an image the engine already has is not built again. Downloads are cached under
# ${XDG_CACHE_HOME:-~/.cache}/cohort/docker, never in the tree.
#
# - busybox: a static busybox (`busybox-static` from Debian) with its applets: for container
#   lifecycle tests (exit codes, logs, stop grace, name conflicts). Seconds.
# - prefect: Debian bookworm (debootstrap minbase) with python3, tini and Prefect 3.8.8 in
#   /opt/prefect (pinned by constraints/prefect-3.8.8.txt), tini as the entrypoint, as
#   Prefect's official image has it; also tagged `prefecthq/prefect:3.8.8-python3.11`, the
#   image Prefect's Docker worker defaults to, so a template with no image runs offline.
#   About 2-3 minutes cold.
set -euo pipefail

what=${1:-all}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints="$root/constraints/prefect-3.8.8.txt"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cohort/docker"
mkdir -p "$cache"

die() { echo "docker-test-images: $*" >&2; exit 1; }
log() { echo "docker-test-images: $*" >&2; }

# One build at a time: test binaries running side by side each ask for the images on a fresh
# engine, and two debootstraps into one root file system fail. The others wait, then find
# the images built.
command -v flock >/dev/null || die "flock (util-linux) is not installed"
exec 9>"$cache/.lock"
flock 9

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is the daemon running, and may this user use its socket?)"

key() { cat "$@" | sha256sum | cut -c1-12; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror the machine's apt already uses.
mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '^(URIs:|deb) +[^ ]+' \
        | awk '{print $2}' | grep -v security | head -1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

apt_install() {
    command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available to install it"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } \
        || die "could not install $*"
}

build_busybox() {
    local tag="cohort-test/busybox:$(key "${BASH_SOURCE[0]}")"
    if ! have "$tag"; then
        log "building $tag"
        local work
        work=$(mktemp -d)
        trap 'rm -rf "$work"' RETURN
        (cd "$work" && apt-get download -qq busybox-static >/dev/null 2>&1) \
            || { apt-get update -qq >/dev/null && (cd "$work" && apt-get download -qq busybox-static >/dev/null); } \
            || die "could not download busybox-static from the Debian mirror"
        dpkg-deb -x "$work"/busybox-static_*.deb "$work/x"
        local fs="$work/fs"
        mkdir -p "$fs/bin" "$fs/tmp" "$fs/etc" "$fs/root"
        chmod 1777 "$fs/tmp"
        cp "$work/x/bin/busybox" "$fs/bin/busybox"
        for applet in $("$fs/bin/busybox" --list); do
            [[ $applet == busybox ]] || ln -sf busybox "$fs/bin/$applet"
        done
        printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$fs/etc/passwd"
        printf 'root:x:0:\nnogroup:x:65534:\n' >"$fs/etc/group"
        tar --numeric-owner -C "$fs" -c . \
            | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$tag" >/dev/null
    fi
    echo "busybox $tag"
}

build_prefect() {
    local tag="cohort-test/prefect:3.8.8-$(key "${BASH_SOURCE[0]}" "$constraints")"
    if ! have "$tag"; then
        log "building $tag (a few minutes)"
        command -v debootstrap >/dev/null || apt_install debootstrap
        local rootfs="$cache/rootfs-bookworm"
        if [[ ! -x $rootfs/usr/bin/python3 || ! -x $rootfs/usr/bin/tini ]]; then
            rm -rf "$rootfs"
            debootstrap --variant=minbase --include=python3,python3-venv,tini,ca-certificates \
                bookworm "$rootfs" "$(mirror)" >"$cache/debootstrap.log" 2>&1 \
                || die "debootstrap failed (see $cache/debootstrap.log)"
        fi
        # Wheels for the image's Python (3.11 on bookworm), whatever the host runs.
        local wheels="$cache/wheels-$(key "$constraints")"
        if [[ ! -f $wheels/.complete ]]; then
            rm -rf "$wheels"
            mkdir -p "$wheels"
            local py=${PYTHON:-python3}
            env -u PIP_FIND_LINKS "$py" -m pip download -q --only-binary=:all: \
                --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform any \
                -c "$constraints" prefect==3.8.8 'async-timeout>=4.0.3' -d "$wheels" \
                || die "could not download the Prefect wheels"
            touch "$wheels/.complete"
        fi
        # The venv is made in a copy, so the cached rootfs stays clean for the next pin.
        local work
        work=$(mktemp -d)
        trap 'rm -rf "$work"' RETURN
        cp -a "$rootfs" "$work/fs"
        mkdir -p "$work/fs/tmp/wheels" "$work/fs/opt/flows"
        cp "$wheels"/*.whl "$work/fs/tmp/wheels/"
        grep -v '^async-timeout' "$constraints" >"$work/fs/tmp/constraints.txt" || true
        chroot "$work/fs" /usr/bin/python3 -m venv /opt/prefect
        env -u PIP_FIND_LINKS -u PIP_CERT chroot "$work/fs" /opt/prefect/bin/pip install -q \
            --no-index --find-links /tmp/wheels -c /tmp/constraints.txt \
            prefect==3.8.8 'async-timeout>=4.0.3' \
            || die "could not install Prefect into the image"
        rm -rf "$work/fs/tmp/wheels" "$work/fs/tmp/constraints.txt" "$work/fs/var/cache/apt/archives"/*.deb
        local version
        version=$(chroot "$work/fs" /opt/prefect/bin/python -c 'import prefect; print(prefect.__version__)')
        [[ $version == 3.8.8 ]] || die "the image has Prefect $version, not 3.8.8"
        tar --numeric-owner -C "$work/fs" -c . | docker import \
            --change 'ENV PATH=/opt/prefect/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENTRYPOINT ["/usr/bin/tini", "-g", "--"]' \
            --change 'WORKDIR /opt/flows' \
            - "$tag" >/dev/null
    fi
    docker tag "$tag" prefecthq/prefect:3.8.8-python3.11
    echo "prefect $tag"
}

case "$what" in
    busybox) build_busybox ;;
    prefect) build_prefect ;;
    all) build_busybox; build_prefect ;;
    *) die "unknown image '$what' (busybox, prefect or all)" ;;
esac
