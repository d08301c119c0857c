#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine:
#   scripts/bootstrap.sh demo   install deps, build, make the embedded tiny model, run `flashmem generate`, then
#                               bring up the local cluster and complete a prompt through the public API
#   scripts/bootstrap.sh test   install deps, build, run every test (ctest)
#   scripts/bootstrap.sh build  install deps, build
#   scripts/bootstrap.sh deps   install deps only
# Environment: BUILD_DIR (default build), JOBS (default nproc), SKIP_DEPS=1 to skip apt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
mode=${1:-test}

# The apt line of DESIGN.md §6, plus the compilers CMake needs, openssl (test certificates), Node.js
# (offline validation of the Kubernetes manifests, deploy/k8s/validate) and iproute2 (the
# multi-host test in network namespaces).
PKGS="libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libucx-dev ucx-utils \
libabsl-dev librocksdb-dev libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev libspdlog-dev \
libfmt-dev prometheus-cpp-dev nlohmann-json3-dev libyaml-cpp-dev libxxhash-dev libgloo-dev \
libpcre2-dev ninja-build pkg-config cmake g++ openssl nodejs iproute2"

# The manifest validator's npm packages (pinned by its package-lock.json), into deploy/k8s/validate.
npm_deps() {
  [ -d deploy/k8s/validate/node_modules/kubernetes-models ] && return 0
  command -v npm > /dev/null || DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y --no-install-recommends npm
  echo "[bootstrap] npm ci in deploy/k8s/validate"
  (cd deploy/k8s/validate && npm ci --no-audit --no-fund --loglevel=error)
}

install_deps() {
  [ "${SKIP_DEPS:-0}" = 1 ] && return 0
  local missing=""
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  if [ -z "$missing" ]; then echo "[bootstrap] dependencies present"
  else
    echo "[bootstrap] installing:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
  fi
  npm_deps
}

build() {
  local cuda_args=()
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    cuda_args=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90a}")
  fi
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} "${cuda_args[@]}"
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

tiny_model() {
  local dir=${TINY_DIR:-$BUILD_DIR/models/tiny}
  if [ ! -f "$dir/model.safetensors" ] || [ ! -f "$dir/tokenizer.json" ]; then
    "$BUILD_DIR/worker/cli/flashmem" ckpt random --preset tiny --seed 1 --out "$dir"
  fi
  echo "$dir"
}

case "$mode" in
  deps) install_deps ;;
  build) install_deps; build ;;
  demo)
    install_deps; build
    dir=$(tiny_model | tail -1)
    "$BUILD_DIR/worker/cli/flashmem" ckpt inspect "$dir" | head -20
    echo "== the engine directly"
    "$BUILD_DIR/worker/cli/flashmem" generate --model "$dir" --prompt "The memory tier keeps every page of" --max-new-tokens 24
    echo "== the whole system: memtier + coordinator + 2 workers on 127.0.0.1, text through the public API"
    fm="$BUILD_DIR/worker/cli/flashmem"
    "$fm" cluster down --run-dir "$BUILD_DIR/run" > /dev/null 2>&1 || true
    "$fm" cluster up --workers 2 --model "$dir" --run-dir "$BUILD_DIR/run"
    trap '"$fm" cluster down --run-dir "$BUILD_DIR/run" > /dev/null 2>&1 || true' EXIT
    "$fm" complete --run-dir "$BUILD_DIR/run" --prompt "The memory tier keeps every page of" --max-tokens 24
    "$fm" cluster down --run-dir "$BUILD_DIR/run"
    trap - EXIT
    echo "(random weights: the text is noise; the same tokens come out both ways)"
    ;;
  test)
    install_deps; build
    cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS" --timeout 1500
    ;;
  *) echo "usage: $0 demo|test|build|deps" >&2; exit 2 ;;
esac
