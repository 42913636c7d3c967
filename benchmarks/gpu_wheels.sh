#!/usr/bin/env bash
# Build the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network access whose Python lacks
# trl, datasets or deepspeed. Run it on a networked Linux x86-64 machine with the project's dependencies installed:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .gpu_wheels (git-ignored); prints its size
#
# The versions are the ones installed here, so the GPU runs the code the CPU tests ran. trl, datasets and their small
# pure-Python needs are downloaded as Python 3.12 / manylinux x86-64 wheels (change --python-version below for another
# Python); DeepSpeed ships only a source archive, so it is built here into a pure-Python wheel (DS_BUILD_OPS=0: no op
# is compiled; ZeRO-3 needs none).
#
# Then copy the repository and this folder to the GPU machine and run there:
#   bash benchmarks/gpu_check.sh --wheels .gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu_wheels}"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl

version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }

# trl, datasets, deepspeed and the needs a bare torch + transformers image lacks. fsspec travels too: datasets pins an
# upper bound, and the image's own fsspec may be newer than it allows.
PURE=(trl datasets dill multiprocess fsspec hjson pydantic pydantic_core annotated-types typing-inspection)
SPECS=()
for name in "${PURE[@]}"; do SPECS+=("$name==$(version "$name")"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${SPECS[@]}"

DEEPSPEED="deepspeed==$(version deepspeed)"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
python -m pip download -q --no-deps --no-binary :all: -d "$BUILD" "$DEEPSPEED"
# No build isolation: DeepSpeed's setup.py imports torch, and this machine's CPU torch is enough to package it
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda python -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$BUILD"/deepspeed-*.tar.gz

ls -1 "$DIR"
echo "wheels: $(ls "$DIR"/*.whl | wc -l) files, $(du -sh "$DIR" | cut -f1) in $DIR"
