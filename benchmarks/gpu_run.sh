#!/usr/bin/env bash
# GPU benchmark run for issues #2 (CNN LRP speed) and #3 (ViT LRP speed), sized for one
# device call of at most 10 minutes; the steps together are capped at about 7 minutes.
#
#   bash benchmarks/gpu_run.sh        # from the repo root; device call with carry [".whl"]
#
# .whl/ (git-ignored) must hold the wheels the device lacks: zennit 0.5.1, lxt 2.1 (built
# from its sdist) and, because lxt 2.1 does not import under transformers 5 (it imports
# find_pruneable_heads_and_indices), transformers 4.57.6 with the huggingface_hub 0.36.2 and
# tokenizers 0.22.2 that transformers 4.57 checks for at import time. They go to /tmp/site,
# ahead of the device's own packages; pxopt runs from the source tree.
#
# Output (to $OUT, else /tmp/gpu_out): lrp_cnn_h200.md, lrp_vit_h200.{md,json}, env.txt
# (nvidia-smi, torch, cuDNN/TF32 flags, GPU state before/after each step) and gpu_run.log.
# Every step runs under `timeout`; a failing or timed-out step does not stop the next, and
# both benchmarks rewrite their results after each row/batch, so a cut-off run keeps rows.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CNN_LIMIT_S=${CNN_LIMIT_S:-210}  # resnet50 + vgg16, batch 8 and 32, 4 composites x 2 methods
VIT_LIMIT_S=${VIT_LIMIT_S:-150}  # two ViT-B/16, batch 1 / 8 / 32, 7-8 methods
# Appended to each command line (argparse keeps the last value), e.g. for a dry run on a CPU:
#   CNN_EXTRA="--device cpu --models resnet50 --batches 1 --size 64 --warmup 0 --repeats 1" \
#   VIT_EXTRA="--device cpu --batches 1 --rounds 1" bash benchmarks/gpu_run.sh
CNN_EXTRA=${CNN_EXTRA:-}
VIT_EXTRA=${VIT_EXTRA:-}

gpu_state() {
    # GPU load and the compute processes on it: "otherwise idle" means no process but ours.
    echo "--- GPU state ($1, $(date -u +%H:%M:%S) UTC)"
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total,clocks.sm,temperature.gpu,power.draw \
        --format=csv
    echo "compute processes:"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
}

install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "WARNING: no .whl/ here (carry it): zennit / lxt comparisons will be skipped"
        export PYTHONPATH=$PWD
        return
    fi
    ls -l .whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "WARNING: wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
}

environment() {
    nvidia-smi
    python3 - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
c = torch.backends.cudnn
print(f"cudnn version={c.version()} enabled={c.enabled} benchmark={c.benchmark} "
      f"deterministic={c.deterministic} conv.fp32_precision="
      f"{getattr(getattr(c, 'conv', None), 'fp32_precision', None)} "
      f"matmul.fp32_precision={getattr(torch.backends.cuda.matmul, 'fp32_precision', None)} "
      f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
for name in ("torchvision", "timm", "numpy", "zennit", "lxt", "transformers", "huggingface_hub",
             "tokenizers", "accelerate"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
EOF
    gpu_state "before the benchmarks"
}

# Prints the flag that turns a comparison off when its package does not import.
skip_flag() {
    python3 -c "$1" >/dev/null 2>&1 && return
    echo "WARNING: '$1' fails; running without that comparison:" >&2
    python3 -c "$1" 2>&1 | tail -3 >&2
    echo "$2"
}

idle_note() {
    # One line for the results files: what the GPU was doing right before the step.
    local apps
    apps=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c '^[0-9]')
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits 2>/dev/null |
        awk -F', ' -v apps="$apps" '{printf "GPU state right before this benchmark (benchmarks/gpu_run.sh): utilization %s %%, memory used %s MiB, %d other compute process(es).", $1, $2, apps}'
}

step() {
    # step NAME LIMIT_S CMD...: run under timeout, report the exit code and the time taken.
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    gpu_state "after $name" >>"$OUT/env.txt"
}

main() {
    echo "gpu_run.sh at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u)"
    install_wheels
    environment | tee "$OUT/env.txt"
    local zflag lflag
    zflag=$(skip_flag "import zennit.composites, zennit.torchvision" --no-zennit)
    lflag=$(skip_flag "from lxt.efficient.models.vit_torch import cp_LRP" --no-lxt)

    # shellcheck disable=SC2086  # the flags and extras are meant to split into words
    step lrp_cnn "$CNN_LIMIT_S" python3 benchmarks/lrp_cnn.py --device cuda \
        --models resnet50 vgg16 --batches 8 32 --warmup 2 --repeats 5 $zflag $CNN_EXTRA \
        --note "$(idle_note)" --out "$OUT/lrp_cnn_h200.md"
    # shellcheck disable=SC2086
    step lrp_vit "$VIT_LIMIT_S" python3 benchmarks/lrp_vit.py --device cuda \
        --batches 1 8 32 --rounds 5 $lflag $VIT_EXTRA \
        --note "$(idle_note)" --out "$OUT/lrp_vit_h200"
    ls -l "$OUT"
}

main 2>&1 | tee "$OUT/gpu_run.log"
