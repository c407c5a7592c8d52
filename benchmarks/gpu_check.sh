#!/usr/bin/env bash
# One prepared check on a lent GPU machine: CUDA tests and the GPU benchmarks, ≤ 8 minutes in all.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root
#
# Carried wheels (.whl/*.whl: transformers at the version pyproject pins, diffusers and what it
# lacks there) are installed into /tmp/site first.
# Every step runs under its own `timeout` and the script goes on after a failing one; each step's
# output goes to $OUT/<step>.log, one line per step (status, seconds) to $OUT/summary.txt.
# Without CUDA (a dry run on a CPU machine) the benchmarks are skipped and the tests skip themselves.
set -u

OUT=${OUT:?set OUT to an output folder}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# step NAME SECONDS COMMAND...: run under timeout, log to $OUT/NAME.log, one summary line
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    local verdict=ok
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$status" -ne 0 ]; then verdict="FAILED"; fi
    local shown="${*//$'\n'/ }"
    printf '%-10s %-8s rc=%-3s %4ss  %.110s\n' "$name" "$verdict" "$status" "$((SECONDS - start))" "$shown" | tee -a "$SUMMARY"
}

skip() {
    printf '%-10s %-8s %s\n' "$1" "skipped" "$2" | tee -a "$SUMMARY"
}

# 1. carried wheels
if ls .whl/*.whl > /dev/null 2>&1; then
    step install 40 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    # diffusers needs huggingface_hub ≥ 1.32 and safetensors ≥ 0.8: carried as a fallback, used only if needed
    if ! "$PYTHON" -c "import diffusers" > /dev/null 2>&1 && ls .whl/fallback/*.whl > /dev/null 2>&1; then
        step fallback 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site-fallback .whl/fallback/*.whl
        export PYTHONPATH="/tmp/site:/tmp/site-fallback:${PYTHONPATH#/tmp/site:}"
    fi
else
    skip install "no .whl/ folder"
fi

# 2. the machine and the versions
step info 30 bash -c "nvidia-smi || echo 'no nvidia-smi'; \"$PYTHON\" - <<'PY'
import importlib, platform, sys
print('python', sys.version.split()[0], platform.platform())
for name in ('torch', 'transformers', 'diffusers', 'peft', 'accelerate', 'safetensors', 'huggingface_hub', 'numpy'):
    try:
        module = importlib.import_module(name)
        print(f'{name:16s} {module.__version__:12s} {module.__file__}')
    except Exception as error:
        print(f'{name:16s} MISSING: {error}')
import torch
print('cuda available', torch.cuda.is_available(), 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')
import lavender.student, lavender.training.trainer, lavender.teacher.extract
print('datasets imported:', 'datasets' in sys.modules, '(only transformers.Trainer imports it, when installed)')
PY"

CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 3. the CUDA tests (they skip themselves without a GPU)
step tests 100 "$PYTHON" -m pytest -p no:cacheprovider -m cuda -v -s -rs tests/test_cuda.py

# 4. capture: plain SFT vs capture vs eager at Llama-3.2-11B-Vision shapes, bf16, LoRA; then where
#    the capture's step time and memory go (torch.profiler tables of one step)
if [ "$CUDA" = 1 ]; then
    step capture 150 "$PYTHON" benchmarks/bench_capture.py --mllama-11b --steps 3 --modes plain lavender eager
    step profile 90 "$PYTHON" benchmarks/bench_capture.py --mllama-11b --steps 1 --profile lavender
else
    skip capture "no CUDA"
fi

# 5. teacher extraction at SD-1.4 shapes, fp16
if [ "$CUDA" = 1 ]; then
    step targets 110 "$PYTHON" benchmarks/bench_targets.py --sd14
else
    skip targets "no CUDA"
fi

echo "=== done in ${SECONDS}s" | tee -a "$SUMMARY"
