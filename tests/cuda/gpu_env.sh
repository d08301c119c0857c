# Sourced by the GPU run scripts (from the repo root, bundle unpacked in .gpu/run): OUT from the
# first argument (default GPU_OUT_DEFAULT), the repo root and the bundle linked where the binaries
# expect them (/work/main, build), R = the bundle's launcher.
ROOT=$(pwd)
OUT=${1:-$GPU_OUT_DEFAULT}
mkdir -p "$OUT"
if [ "$ROOT" != /work/main ] && [ ! -e /work/main ]; then mkdir -p /work && ln -s "$ROOT" /work/main; fi
[ -e build ] || ln -s "$ROOT/.gpu/run" build
R=.gpu/run/run.sh
