#!/usr/bin/env bash
# Builds a Debian bookworm image with Python 3.11 and venv, offline from the Debian mirror,
# because no image can be pulled from any registry on our CI machines. Cached by tag: a second
# call returns at once. Usage: build-base-image.sh [TAG]
set -euo pipefail
tag="${1:-mlflow-dock-test-base:bookworm-py3.11}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"; exit 0
fi
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /tmp/mlflow-dock-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >&2
# Leave the image as lean as the official slim images: no apt lists, no caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$tag" >&2
echo "$tag"
