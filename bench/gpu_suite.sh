#!/usr/bin/env bash
# The GPU checks for one call on a lent GPU machine, most important first, each under its own
# time limit so that a slow one cannot starve the rest:
#   0. bench/gpu_check.py --quick: host copies queued, synchronized batch norm on CUDA;
#   1. the step's operators on CUDA (bench/step_ops.py), and an earlier gan/step.py against
#      today's in one process (bench/step_ab.py), when $STEP_BEFORE names that file (default
#      .whl/step_before.py: `git show REV:gan/step.py > .whl/step_before.py` before the call);
#   2. the default pipeline end to end on the GPU (Ray Train, NCCL, MLflow, the registry), then
#      `ganpipe generate` from the registered model;
#   3. bench/gpu_ray_train.py: Ray Train on the GPU against the bare loop on the same card
#      (the 64x64 DCGAN, 2 rounds of 1,000 steps: about 180 s).
# At most 555 s in all, inside one call's 10-minute limit (on the H200, 2026-11-28: check 0 took
# a few seconds, 2 took 122 s and 4 s, 3 about 200 s; 1 is new and not yet timed on a GPU).
# Two CPU workers on the GPU machine's 16 cores (bench/train_overhead.py --workers 2) were
# measured once (docs/benchmarks.md) and left the suite. Needs torch with CUDA and the project's
# other packages importable: bench/device_bundle.sh packs them for a machine that has no
# package index.
#   bash bench/gpu_suite.sh OUT_DIR
set -u
out=${1:?usage: bench/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
workdir=$(mktemp -d)

python3 -c "import sys, torch, ray, mlflow; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__, torch.cuda.get_device_name())" \
  || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 0. bench/gpu_check.py --quick"
timeout 40 python3 bench/gpu_check.py --quick

echo "== 1. bench/step_ops.py and bench/step_ab.py on CUDA"
timeout 45 python3 bench/step_ops.py --device cuda --model dcgan64,default
before=${STEP_BEFORE:-.whl/step_before.py}
if [ -f "$before" ]; then
  # The earlier step predates train.reuse_fakes: both versions run with fresh fakes.
  timeout 60 python3 bench/step_ab.py --before "$before" --device cuda --model dcgan64 --blocks 30 \
    -- train.reuse_fakes=false
else
  echo "step_ab.py skipped: no $before"
fi

echo "== 2. ganpipe run train.use_gpu=true train.workers=1"
start=$(date +%s)
timeout 160 python3 -m pipelines.cli run train.use_gpu=true train.workers=1 "workdir=$workdir"
echo "ganpipe run: exit $?, $(($(date +%s) - start)) s"
timeout 30 python3 -m pipelines.cli generate --model models:/ganpipe-digits/1 -n 64 \
  --out "$out/gpu_grid.png" --workdir "$workdir"
echo "ganpipe generate: exit $?"

echo "== 3. bench/gpu_ray_train.py"
timeout 220 python3 bench/gpu_ray_train.py --model dcgan64 --steps 1000 --warmup 200 --rounds 2
