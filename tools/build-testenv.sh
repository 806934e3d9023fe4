#!/usr/bin/env bash
# Builds (or reuses) the real binaries of the test environment from pinned Go modules.
#
# Each tool lives in its own small module under tools/<name>/ whose go.mod pins the
# release. A build is cached under $XDG_CACHE_HOME/kube-fledged/bin/<key>/, where the
# key hashes go.mod, go.sum and this script, so a second run builds nothing. The
# binaries are then linked into .testenv/bin/, where the Python test environment,
# `make demo` and the benchmarks look for them.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kube-fledged/bin
out=$repo/.testenv/bin
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
mkdir -p "$cache" "$out"

version_of() { # module dir, module path -> pinned version from go.mod
  awk -v m="$2" '$1 == "require" && $2 == m {print $3} $1 == m && $2 ~ /^v/ {print $2}' "$1/go.mod" | head -n1
}

# build NAME MODULE_PATH LDFLAGS TAGS PACKAGE:BINARY...
build() {
  local name=$1 module=$2 ldflags=$3 tags=$4; shift 4
  local dir=$here/$name version key dest
  version=$(version_of "$dir" "$module")
  key=$name-$version-$(cat "$dir/go.mod" "$dir/go.sum" "$0" | sha256sum | cut -c1-12)
  dest=$cache/$key
  if [[ ! -f $dest/.complete ]]; then
    echo ">> building $name $version (cache miss: $dest)"
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    local spec pkg bin start=$SECONDS
    for spec in "$@"; do
      pkg=${spec%%:*} bin=${spec##*:}
      (cd "$dir" && go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$dest.tmp/$bin" "$pkg")
    done
    touch "$dest.tmp/.complete"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo ">> built $name $version in $((SECONDS - start))s"
  else
    echo ">> reusing $name $version from $dest"
  fi
  for spec in "$@"; do
    ln -sfn "$dest/${spec##*:}" "$out/${spec##*:}"
  done
}

kv=$(version_of "$here/kube" k8s.io/kubernetes)
kminor=$(echo "$kv" | cut -d. -f2)
kflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kflags+=" -X $p.gitVersion=$kv -X $p.gitMajor=1 -X $p.gitMinor=$kminor -X $p.gitTreeState=clean"
done
cv=$(version_of "$here/containerd" github.com/containerd/containerd/v2)
hv=$(version_of "$here/helm" helm.sh/helm/v3)

only=${1:-all}
want() { [[ $only == all || $only == "$1" ]]; }
want etcd && build etcd go.etcd.io/etcd/server/v3 "" "" ./cmd/etcd:etcd
want containerd && build containerd github.com/containerd/containerd/v2 \
  "-X github.com/containerd/containerd/v2/version.Version=$cv" "no_btrfs no_devmapper no_zfs" \
  github.com/containerd/containerd/v2/cmd/containerd:containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2:containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr:ctr
want helm && build helm helm.sh/helm/v3 "-X helm.sh/helm/v3/internal/version.version=$hv" "" \
  helm.sh/helm/v3/cmd/helm:helm
want kube && build kube k8s.io/kubernetes "$kflags" "" \
  k8s.io/kubernetes/cmd/kube-apiserver:kube-apiserver \
  k8s.io/kubernetes/cmd/kubectl:kubectl \
  k8s.io/kubernetes/cmd/kubelet:kubelet \
  k8s.io/kubernetes/cmd/kube-controller-manager:kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler:kube-scheduler
echo ">> test environment binaries in $out"
