#!/usr/bin/env bash
# Builds the Dockerfile with a real Docker daemon and runs both roles' --help in it.
#
# No container registry is reachable from here, so the base image is made from
# Debian's own packages (debootstrap: bookworm + python3, the Python the official
# base ships too) and imported. The build uses the test environment's dockerd
# (vfs storage, host network for pip). Slow (minutes); not part of `make test`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/fledged-image-check}
mkdir -p "$work"
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
if [[ ! -f $work/base.tar ]]; then
  rm -rf "$work/rootfs"
  [[ -d $work/rootfs/usr/bin ]] || debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" http://deb.debian.org/debian
  # This machine's trust store: PyPI is reached through whatever it trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$work/rootfs" -cf "$work/base.tar" .
fi
sock=$work/docker.sock
echo "{}" >"$work/daemon.json"
dockerd --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/docker.pid" \
  -H "unix://$sock" --storage-driver vfs --iptables=false --ip6tables=false --bridge=none \
  --config-file "$work/daemon.json" >"$work/dockerd.log" 2>&1 &
stop_dockerd() {
  local pid
  pid=$(cat "$work/docker.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  umount -l "$work/exec/netns/default" 2>/dev/null || true
}
trap stop_dockerd EXIT
for _ in $(seq 60); do docker -H "unix://$sock" info >/dev/null 2>&1 && break; sleep 1; done
export DOCKER_HOST=unix://$sock
docker import "$work/base.tar" fledged-base:bookworm >/dev/null
docker build --network host --build-arg BASE=fledged-base:bookworm -t kube-fledged-py:check "$repo"
docker run --rm --network none kube-fledged-py:check fledged-coordinator --help | head -3
docker run --rm --network none kube-fledged-py:check fledged-agent --help | head -3
docker run --rm --network none kube-fledged-py:check id
docker image ls kube-fledged-py:check
