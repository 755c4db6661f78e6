#!/usr/bin/env bash
# The GPU check of issue 15 in one run (< 8 minutes on one H100/H200): the GPU tests, the network alone at bf16
# batch 32 768x1024 10 scanpath components eager and with the compiled head, and `deepgaze fit` end to end (512
# training / 64 validation images of MIT1003's sizes, bf16-mixed, batch 16, feature cache off and on, 2 epochs).
# Every figure goes to files in the output folder (at most 6 files); the goals table is printed last.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]              # default: $OUT, else ./gpu_check_out
#   bash benchmarks/gpu_check.sh --cpu-smoke [OUTPUT_DIR]  # the same steps on the CPU, tiny and float32 (bf16
#                                                           # convolutions crawl on CPUs without bf16 units)
#
# Installs nothing from the network: wheels in .whl/ (if any) are installed into /tmp/site first (see
# benchmarks/README.md for which and how). Each step has its own time limit and the script goes on after a failure.
set -u -o pipefail

smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    smoke=1
    shift
fi
repository=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-${OUT:-gpu_check_out}}" && cd "${1:-${OUT:-gpu_check_out}}" && pwd)
cd "$repository"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}"

summary="$out/summary.txt"
: >"$summary"
network_json="$out/network.jsonl"
: >"$network_json"
train_json="$out/train.json"

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output appended to NAME.txt, its status and
# duration to summary.txt.
step() {
    local name=$1 limit=$2 begin status
    shift 2
    begin=$(date +%s)
    echo "### $*" >>"$out/$name.txt"
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    status=$?
    echo "step $name: exit $status after $(($(date +%s) - begin)) s (limit $limit s): $*" | tee -a "$summary"
}

{
    echo "gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), smoke=$smoke"
    "$python" - <<'EOF'
import importlib.metadata as metadata
import os
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning", metadata.version("lightning"),
      "jsonargparse", metadata.version("jsonargparse"))
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    print("device", properties.name, f"{properties.total_memory / 2**30:.0f} GiB,", properties.multi_processor_count,
          "SMs,", os.cpu_count(), "CPUs")
else:
    print("device cpu,", os.cpu_count(), "CPUs,", torch.get_num_threads(), "torch threads")
EOF
} 2>&1 | tee -a "$summary"

if [ "$smoke" = 1 ]; then
    tests=tests/test_performance_gpu_paths.py
    step tests 600 "$python" -m pytest -q -x -p no:cacheprovider \
        "$tests::test_head_path_taken_under_compile_computes_the_same_in_eager_mode" \
        "$tests::test_gpu_compiled_bf16_head_matches_the_eager_float32_head" \
        "$tests::test_gpu_path_bf16_channels_last_pinned_memory_with_the_cache"
    network=(--device cpu --dtype fp32 --sizes 128x192 --batch 2 --components 1 --repeats 1 --json "$network_json")
    step network 600 "$python" benchmarks/network.py "${network[@]}"
    step network 600 "$python" benchmarks/network.py "${network[@]}" --compile head
    step train 900 "$python" benchmarks/train.py --device cpu --precision 32 --runs mit1003 mit1003+cache \
        --epochs 2 --batch-size 2 --mit-train-images 2 --mit-val-images 2 --json "$train_json"
else
    step tests 100 "$python" -m pytest -q -m "not slow" -p no:cacheprovider tests/test_performance_gpu_paths.py
    network=(--device cuda --dtype bf16 --sizes 768x1024 --batch 32 --components 10 --repeats 5
             --json "$network_json")
    step network 80 "$python" benchmarks/network.py "${network[@]}"
    step network 160 "$python" benchmarks/network.py "${network[@]}" --compile head
    step train 170 "$python" benchmarks/train.py --device cuda --runs mit1003 mit1003+cache --epochs 2 \
        --batch-size 16 --mit-train-images 512 --mit-val-images 64 --num-workers 8 --json "$train_json"
fi

"$python" - "$network_json" "$train_json" <<'EOF' 2>&1 | tee -a "$summary"
"""The goals table of issue 15 from the results written above (a missing result is shown as '-')."""
import json
import sys
from pathlib import Path

network_path, train_path = (Path(argument) for argument in sys.argv[1:])
print("\nissue 15 goals (bf16-mixed, 10 scanpath components, 768x1024 unless the smoke run says otherwise)")
print(f"{'measure':<58} {'measured':>10} {'goal':>8}")
network = [json.loads(line) for line in network_path.read_text().splitlines() if line.strip()]
for result in network:
    label = (f"network alone, batch {result['batch']} {result['size']}, "
             f"{'compiled head' if result['compile'] else 'eager'}: train img/s")
    print(f"{label:<58} {result['train_images_per_s']:>10.1f} {'>= 600':>8}")
    peak = result.get("train_peak_gb", result.get("peak_rss_gb"))
    print(f"{'  its peak memory GB (CUDA max allocated, or CPU RSS)':<58} {peak:>10.2f} {'':>8}")
if not network:
    print(f"{'network alone':<58} {'-':>10}")
runs = json.loads(train_path.read_text()) if train_path.exists() else {}
goals = {("mit1003", 0): ">= 150", ("mit1003+cache", 0): ">= 150", ("mit1003+cache", 1): ">= 300"}
for run, result in runs.items():
    for epoch in result["epochs"]:
        seconds = sum(epoch[phase] for phase in ("data", "backbone", "readout+loss", "optimiser"))
        label = f"deepgaze fit {run}, epoch {epoch['epoch']}: train img/s ({epoch['images']} img)"
        print(f"{label:<58} {epoch['images'] / seconds:>10.1f} {goals.get((run, epoch['epoch']), ''):>8}")
        if epoch.get("val_images"):
            label = f"  validation img/s ({epoch['val_images']} img; goal: >= train img/s)"
            print(f"{label:<58} {epoch['val_images'] / epoch['validation']:>10.1f}")
        print(f"{'  other (per-epoch fixed costs) s':<58} {epoch['other']:>10.2f}")
if not runs:
    print(f"{'deepgaze fit':<58} {'-':>10}")
EOF
echo "files in $out: $(ls "$out" | tr '\n' ' ')"
