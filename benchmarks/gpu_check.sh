#!/usr/bin/env bash
# The GPU check, in one run that fits 8 minutes on one H200: versions, the CUDA tests, SoFT's training cost against
# SFTTrainer on random-init Llama-3-8B / LLaMA-2-13B shapes, and the decoding mechanics on a 1B shape. Results land
# as files in --out DIR (default gpu_check_out/).
#
#   bash benchmarks/gpu_check.sh                        # on a GPU machine with the project installed
#   bash benchmarks/gpu_check.sh --dry-run              # CPU, tiny shapes: checks the script itself
# A GPU machine without network access whose Python lacks trl, datasets or deepspeed: build their wheels on a
# networked machine (`bash benchmarks/gpu_wheels.sh`), copy the repository and the wheels to the GPU machine and run
#   bash benchmarks/gpu_check.sh --wheels .gpu_wheels
#
# Files (at most 8, few enough to copy back at once): summary.md (each stage's status and time), versions.txt,
# cuda_tests.log, train_cost.md + train_cost.jsonl, decode_cost.md, gpu_check.log (everything printed).
# Exit status 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
WHEELS=""
RESULTS="gpu_check_out"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --out) RESULTS="$2"; shift ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1

# The repository root first: `python -m benchmarks.X` and this checkout's soft_peft
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$(command -v python3 || command -v python)"
# The tests start `python` and `accelerate` by name; the GPU image may only have `python3`
if ! command -v python > /dev/null; then
    mkdir -p /tmp/soft_peft_bin && ln -sf "$PY" /tmp/soft_peft_bin/python && export PATH="/tmp/soft_peft_bin:$PATH"
fi
if [ "$DRY_RUN" = 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

STATUS=0
SUMMARY="$RESULTS/summary.md"
{ echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), dry run: $DRY_RUN)"; echo; echo "| stage | status | seconds |"; echo "|---|---|---|"; } > "$SUMMARY"

stage() {  # stage NAME TIMEOUT_S COMMAND...: run, time and record one stage; a failed stage does not stop the rest
    local name="$1" limit="$2" started rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    started=$(date +%s)
    if declare -F "$1" > /dev/null; then "$@"; else timeout "$limit" "$@"; fi  # a shell function runs as is
    rc=$?
    local spent=$(( $(date +%s) - started ))
    if [ $rc -eq 0 ]; then echo "| $name | ok | $spent |" >> "$SUMMARY"
    else echo "| $name | FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out')) | $spent |" >> "$SUMMARY"; STATUS=1; fi
    echo "=== $name: exit $rc after ${spent}s"
}

versions() {  # versions REQUIRE(0/1): print what is installed, say what is missing; with 1, fail if anything is
    "$PY" - "$1" "$DRY_RUN" <<'PYTHON' | tee "$RESULTS/versions.txt"
import importlib.metadata, platform, shutil, sys

require, dry_run = sys.argv[1] == "1", sys.argv[2] == "1"
print(f"python {platform.python_version()} ({sys.executable})")
missing = []
for name in ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "triton", "scipy",
             "pytest"]:
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name} MISSING")
        missing.append(name)
# Requirements the installed versions do not meet (the wheels install with --no-deps): a warning, not a failure
import tomllib
from packaging.requirements import Requirement

requirements = [Requirement(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
for name in ("trl", "datasets", "deepspeed"):
    if name not in missing:
        requirements += [Requirement(r) for r in importlib.metadata.requires(name) or []]
for requirement in requirements:
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    try:
        have = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        print(f"unmet: {requirement} (not installed)")
        continue
    if not requirement.specifier.contains(have, prereleases=True):
        print(f"unmet: {requirement} (have {have})")
if dry_run and "triton" in missing:  # TRL's kernels need Triton on a GPU only
    missing.remove("triton")
for tool in ("accelerate", "nvidia-smi"):
    print(f"{tool}: {shutil.which(tool) or 'MISSING'}")
import torch

cuda = torch.cuda.is_available()
print(f"CUDA: {torch.version.cuda}, available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
if cuda:
    print(f"GPU memory: {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
if missing:
    print("missing: " + ", ".join(missing) + " (bash benchmarks/gpu_wheels.sh builds trl, datasets, deepspeed)")
if not dry_run and not cuda:
    print("no CUDA device: run with --dry-run on a CPU")
    sys.exit(1)
sys.exit(1 if require and missing else 0)
PYTHON
}

install_wheels() {
    local site=/tmp/soft_peft_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    # PYTHONPATH precedes site-packages: the carried versions (the ones tested on the CPU) win over the image's
    export PYTHONPATH="$PYTHONPATH:$site"
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
}

echo "=== versions before installing"
versions 0
if [ "$DRY_RUN" = 0 ] && [ -n "$WHEELS" ]; then
    install_wheels || { echo "| install wheels | FAILED |  |" >> "$SUMMARY"; STATUS=1; }
fi
stage versions 120 versions 1

if [ "$DRY_RUN" = 1 ]; then
    # The CUDA tests must be collected (and are skipped here); the CPU copies of their bodies run in the test suite
    stage "cuda tests (collected)" 120 "$PY" -m pytest -q -m cuda tests/cuda --collect-only -p no:cacheprovider
    stage "train cost (tiny, cpu)" 180 "$PY" -m benchmarks.train_cost trainers --shapes tiny --device cpu \
        --modes sft soft --steps 1 --max_length 64 --output "$RESULTS/train_cost.md" --json "$RESULTS/train_cost.jsonl"
    stage "decode cost (tiny, cpu)" 60 "$PY" -m benchmarks.decode_cost ceiling --shape tiny --device cpu \
        --draft_exits 2,4 --max_draft 2 --rounds 1 --new_tokens 4 --output "$RESULTS/decode_cost.md"
else
    stage "cuda tests" 180 bash -c "set -o pipefail; '$PY' -m pytest -q -m cuda tests/cuda -rs -p no:cacheprovider \
        2>&1 | tee '$RESULTS/cuda_tests.log'"
    stage "train cost (llama3-8b, llama2-13b)" 240 "$PY" -m benchmarks.train_cost trainers \
        --shapes llama3-8b,llama2-13b --device cuda --modes sft soft --steps 2 --batch_size 0 \
        --output "$RESULTS/train_cost.md" --json "$RESULTS/train_cost.jsonl"
    stage "decode cost (llama3.2-1b)" 60 "$PY" -m benchmarks.decode_cost ceiling --shape llama3.2-1b --device cuda \
        --draft_exits 4,8,12 --max_draft 4 --output "$RESULTS/decode_cost.md"
fi

echo
cat "$SUMMARY"
exit $STATUS
