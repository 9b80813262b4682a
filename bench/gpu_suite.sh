#!/usr/bin/env bash
# The GPU checks for one call on a lent GPU machine, most important first, each under its own
# time limit so that a slow one cannot starve the rest:
#   0. bench/gpu_check.py --quick: host copies queued, synchronized batch norm on CUDA;
#   1. the default pipeline end to end on the GPU (Ray Train, NCCL, MLflow, the registry), then
#      `ganpipe generate` from the registered model;
#   2. bench/gpu_ray_train.py: Ray Train on the GPU against the bare loop on the same card
#      (the 64x64 DCGAN, 2 rounds of 1,000 steps: about 180 s);
#   3. bench/train_overhead.py with two CPU workers on a machine with more cores than workers.
# At most 550 s in all, inside one call's 10-minute limit (on the H200, 2026-11-28, steps 1 to 3:
# 122 s, 4 s, about 200 s and about 100 s). Needs torch with CUDA and the project's other packages
# importable: bench/device_bundle.sh packs them for a machine that has no package index.
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

echo "== 1. ganpipe run train.use_gpu=true train.workers=1"
start=$(date +%s)
timeout 160 python3 -m pipelines.cli run train.use_gpu=true train.workers=1 "workdir=$workdir"
echo "ganpipe run: exit $?, $(($(date +%s) - start)) s"
timeout 30 python3 -m pipelines.cli generate --model models:/ganpipe-digits/1 -n 64 \
  --out "$out/gpu_grid.png" --workdir "$workdir"
echo "ganpipe generate: exit $?"

echo "== 2. bench/gpu_ray_train.py"
timeout 220 python3 bench/gpu_ray_train.py --model dcgan64 --steps 1000 --warmup 200 --rounds 2

echo "== 3. bench/train_overhead.py --workers 2 (CPU workers, $(nproc) cores)"
timeout 100 python3 bench/train_overhead.py --workers 2 --variants ray,bare --repeats 2 --steps 400
