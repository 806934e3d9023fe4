#!/usr/bin/env bash
# The Debian packages `make test`, `make demo` and .ci/run need, installed when missing:
# the registry, the Docker daemon (with runc), htpasswd for the authenticated registry,
# what builds the Go tools and the suite's static pause binary, CNI plugins, iptables
# and iproute2 for the kubelet nodes, debootstrap for the project image's base. Fails
# within seconds, with the command to run, when it cannot install them.
set -euo pipefail
packages=(docker.io containerd docker-registry apache2-utils runc make gcc libc6-dev git
  containernetworking-plugins iptables iproute2 debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0
command="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them as root with: $command" >&2
  exit 1
fi
echo ">> apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
