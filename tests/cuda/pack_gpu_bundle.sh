#!/bin/bash
# Packs built binaries for the GPU machine into .gpu/NAME.tar.xz, small enough to carry next to
# the working tree (the device tool carries 64 MiB in all; the tracked tree is ~55 MB, most of it
# golden safetensors and the tokenizer):
#   bash tests/cuda/pack_gpu_bundle.sh NAME [--build DIR] BINARY...   (paths relative to the build)
# It runs ../shared/gpu/bundle.sh (the binaries and the libraries the GPU machine lacks), strips
# them, and leaves out the libraries that machine has itself (Ubuntu 24.04 with CUDA 13: OpenSSL 3,
# zstd, PCRE2, the CUDA runtime — run.sh finds it there — and a libstdc++ new enough that run.sh
# never uses the bundled copy). On the GPU machine: mkdir -p .gpu/run && tar -C .gpu/run -xJf
# .gpu/NAME.tar.xz, then source tests/cuda/gpu_env.sh (or bash tests/cuda/run_gpu_tests.sh).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NAME [--build DIR] BINARY..." >&2; exit 2; }
name=$1; shift
build=build-cuda
if [ "${1:-}" = --build ]; then build=$2; shift 2; fi
[ $# -ge 1 ] || { echo "$0: no binaries named" >&2; exit 2; }
[ -d "$build" ] || { echo "$0: build directory '$build' not found (configure a CUDA build first)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
bundle_sh="$root/../shared/gpu/bundle.sh"
[ -f "$bundle_sh" ] || { echo "$0: $bundle_sh not found" >&2; exit 2; }
for b in "$@"; do [ -x "$build/$b" ] || { echo "$0: $build/$b is not a built binary" >&2; exit 2; }; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$bundle_sh" "$build" "$work/out" "$@" > /dev/null
mkdir -p "$work/x"
tar -C "$work/x" -xzf "$work/out/bundle.tar.gz"
find "$work/x" -type f \( -name '*.so*' -o -perm -u+x \) ! -name run.sh -exec strip --strip-unneeded {} + 2>/dev/null || true
rm -rf "$work/x/lib/compat"
rm -f "$work/x"/lib/libcrypto.so.* "$work/x"/lib/libssl.so.* "$work/x"/lib/libzstd.so.* \
      "$work/x"/lib/libpcre2-8.so.* "$work/x"/lib/libcudart.so.*
mkdir -p "$root/.gpu"
out="$root/.gpu/$name.tar.xz"
tar -cf - -C "$work/x" . | xz -9 -T1 --lzma2=preset=9,dict=128MiB > "$out"
tracked=$(cd "$root" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
size=$(stat -c %s "$out")
budget=$((64 * 1024 * 1024))
echo "$out: $size bytes; with the tracked tree ($tracked bytes) $((size + tracked)) of the $budget the device tool carries"
[ $((size + tracked)) -le $budget ] || echo "warning: over the carry limit — split the binaries into two bundles, or (one run needs them all) the archive: split -n 2 -d $out ${out%.tar.xz}.part, carried over two warm device calls (docs/benchmarks.md, \"CUDA backend\")" >&2
