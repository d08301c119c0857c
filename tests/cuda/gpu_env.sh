# Sourced by the GPU run scripts (from the repo root, bundle unpacked in .gpu/run): OUT from the
# first argument (default GPU_OUT_DEFAULT), the repo root and the bundle linked where the binaries
# expect them (/work/main, build), R = the bundle's launcher.
ROOT=$(pwd)
OUT=${1:-$GPU_OUT_DEFAULT}
mkdir -p "$OUT"
if [ "$ROOT" != /work/main ] && [ ! -e /work/main ]; then mkdir -p /work && ln -s "$ROOT" /work/main; fi
# Test binaries name other binaries and data by build-time path (<build>/memtier/flashmem-memtier
# ...): both build-directory names used here point at the bundle.
for b in build build-cuda; do [ -e $b ] || ln -s "$ROOT/.gpu/run" $b; done
R=.gpu/run/run.sh
