#!/usr/bin/env bash
# Issue 5's GPU measurements in one call, for a lent GPU machine (the `device` tool):
#
#     bash scripts/gpu_session.sh
#
# 1. the device checks (scripts/device_check.py): every lowering of every pyramid of
#    PyConvResNet-50 and PyConvHGResNet-50, and PyConvResNet-50 itself, forward and backward,
#    in float32 and bfloat16, against PyTorch in float64 (and PyTorch's own error as yardstick);
# 2. the benchmark: PyConvResNet-50 and ResNet-50 train and inference steps, bfloat16, batch 256,
#    224x224, beside PyTorch (AMP, channels_last) in the same process, with MFU;
# 3. the train step's planned memory at batch 256, with and without rematerialisation;
# 4. the same train step in the other lowerings (evidence for the GPU's lowering policy).
#
# Each stage has a time limit, and all of them end by 570 s (DEADLINE), under the device tool's
# 600 s a call: a stage gets what is left when its own limit would pass the deadline.
# Everything lands under $OUT (the device tool's folder; else runs/gpu) as each stage ends, so
# a stage cut short by its time limit loses only itself. The machine's own python3 runs it (its
# JAX, Flax, optax and PyTorch); it needs neither orbax nor the input pipeline's libraries.
set -u -o pipefail
out=${OUT:-runs/gpu}
mkdir -p "$out"
# JAX would take 75% of the GPU's memory at start; PyTorch shares the process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}

deadline=${DEADLINE:-570}

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, output to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    if (( deadline - SECONDS < limit )); then limit=$((deadline - SECONDS)); fi
    if (( limit < 10 )); then echo "== $name: skipped, no time left"; return; fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    grep -v -E "^(I0000|W0000|WARNING: All log)" "$out/$name.log" | tail -n 60
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"

# The image's own Flax and optax must work with its JAX (an old Flax fails on JAX 0.11's removed
# jax.core names at the first init): one small model's init and gradient norm, else stop here.
if ! "$py" -c "import jax, jax.numpy as jnp, optax; from pyconv_jax.models import create_model; \
m = create_model('pyconvresnet18', num_classes=10); \
v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False); \
print('smoke test: init and optax.tree.norm', float(optax.tree.norm(v['params'])) > 0)" \
    > "$out/smoke.log" 2>&1; then
  tail -n 5 "$out/smoke.log"
  echo "== this machine's JAX/Flax/optax cannot run the project (above); carry the versions in"
  echo "   constraints.txt as wheels (the device tool's README) and run again"
  exit 1
fi
cat "$out/smoke.log"

# The benchmark's batch and resolution; smaller ones check this script on a CPU.
batch=${BATCH:-256}
size=${SIZE:-224}

stage device_check 170 "$py" scripts/device_check.py --models pyconvresnet50,pyconvhgresnet50 \
    --whole_models pyconvresnet50 --output "$out/device_check.json"
stage benchmark 280 "$py" scripts/benchmark.py --models pyconvresnet50,resnet50 \
    --batch_size "$batch" --image_size "$size" --dtype bfloat16 --compare_torch \
    --output "$out/gpu_models.json"
stage memory 100 "$py" scripts/benchmark.py --models pyconvresnet50,resnet50 --notiming \
    --memory_batch_sizes "$batch" --image_size "$size" --dtype bfloat16 \
    --output "$out/gpu_memory.json"
stage lowerings 120 "$py" scripts/benchmark.py --models pyconvresnet50 --lowerings split,dense \
    --batch_size "$batch" --image_size "$size" --dtype bfloat16 \
    --output "$out/gpu_lowerings.json"
