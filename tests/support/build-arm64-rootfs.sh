#!/usr/bin/env bash
# Builds a Debian bookworm arm64 root filesystem with python3 as a tar file, on any host and
# without emulation: debootstrap --foreign only downloads and unpacks (it runs nothing of the
# target), and the packages it leaves for its second stage (python3 and its dependencies) are
# unpacked with dpkg-deb, which does not run maintainer scripts either. Nothing is configured,
# so the dpkg database lists no installed packages; the image is for checking what the native
# builder puts on an arm64 base, not for running on this host. Cached: a second call returns
# at once. Usage: build-arm64-rootfs.sh [OUT.tar]
set -euo pipefail
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mlflow-dock/bookworm-arm64-python3-rootfs.tar}"
if [ -s "$out" ]; then
  echo "$out"; exit 0
fi
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /tmp/mlflow-dock-arm64-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$root" "$mirror" >&2
for deb in "$root"/var/cache/apt/archives/*.deb; do
  # --keep-directory-symlink: /bin, /lib and /sbin stay links into /usr (merged /usr).
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
done
rm -rf "$root"/debootstrap "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# debootstrap --foreign links /proc to the host's; an image must not carry that.
rm -f "$root"/proc && mkdir -p "$root"/proc
mkdir -p "$(dirname "$out")"
tar -C "$root" --numeric-owner --sort=name -cf "$out.tmp" . && mv "$out.tmp" "$out"
echo "$out"
