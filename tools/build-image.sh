#!/usr/bin/env bash
# Builds the project's image from its Dockerfile with a real Docker daemon and saves it
# (`docker save`) under a name keyed by the content it was built from; prints the path:
#   ${FLEDGED_IMAGE_CACHE:-~/.cache/kube-fledged/image}/kube-fledged-py-<key>.tar
# holding the image kube-fledged-py:<key>. A second run on the same sources does nothing.
#
# No container registry is reachable from here, so the base is made from Debian's own
# packages (debootstrap: bookworm + python3, the Python the official base ships too) and
# cached beside the images. The build runs its own short-lived dockerd (overlay2, host
# network for pip) whose data root stays in the cache with the dependencies' stage
# tagged, so a change of the sources alone reuses it. Cold: a few minutes; a source
# change: under a minute; no change: under a second.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLEDGED_IMAGE_CACHE:-$HOME/.cache/kube-fledged/image}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time per cache (the data root is shared)
key=$(cd "$repo" && find Dockerfile .dockerignore pyproject.toml README.md agent common coordinator \
  protos -type f ! -path '*__pycache__*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum \
  | sha256sum | cut -c1-16)
out=$cache/kube-fledged-py-$key.tar
if [[ -f $out ]]; then echo "$out"; exit 0; fi

base=$cache/base-bookworm.tar
if [[ ! -f $base ]]; then
  command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: run make prereqs (or apt-get install -y debootstrap)" >&2
    exit 1
  }
  rootfs=$(mktemp -d /tmp/fledged-rootfs-XXXXXX)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$rootfs" http://deb.debian.org/debian >&2
  # This machine's trust store: PyPI is reached through whatever it trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$rootfs" -cf "$base.tmp" . && mv "$base.tmp" "$base"
  rm -rf "$rootfs"
fi

work=$(mktemp -d /tmp/fledged-image-XXXXXX)
sock=$work/docker.sock
echo "{}" >"$work/daemon.json"
dockerd --data-root "$cache/docker" --exec-root "$work/exec" --pidfile "$work/docker.pid" \
  -H "unix://$sock" --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none \
  --ip-forward=false \
  --config-file "$work/daemon.json" >"$work/dockerd.log" 2>&1 &
cleanup() {
  local pid
  pid=$(cat "$work/docker.pid" 2>/dev/null || true)
  if [[ -n $pid ]]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  grep -oE " ($work|$cache/docker)/[^ ]*" /proc/self/mountinfo | sort -r \
    | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export DOCKER_HOST=unix://$sock DOCKER_BUILDKIT=0
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
# Imported once: a new import is a new image, which no cached layer builds on.
docker image inspect fledged-base:bookworm >/dev/null 2>&1 || docker import "$base" fledged-base:bookworm >/dev/null
build=(docker build --network host --build-arg BASE=fledged-base:bookworm)
"${build[@]}" --target deps -t fledged-deps:cache "$repo" >&2  # kept by the prune below
"${build[@]}" -t "kube-fledged-py:$key" "$repo" >&2
docker save -o "$out.tmp" "kube-fledged-py:$key" && mv "$out.tmp" "$out"
# Keep the build's layers for the next one; drop the images no tag names any more.
for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' kube-fledged-py); do
  [[ $old == "kube-fledged-py:$key" ]] || docker rmi "$old" >/dev/null
done
docker image prune -f >/dev/null
# Keep the three newest images.
ls -t "$cache"/kube-fledged-py-*.tar | tail -n +4 | xargs -r rm -f
echo "$out"
