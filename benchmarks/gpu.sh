#!/usr/bin/env bash
# GPU figures in one go (about 8 minutes on one H100/H200), printed and written to reports/:
#  1. the real job at full size: `fashioncap rehearse --size full` (BLIP-base and H&M-shaped stand-ins in
#     a Hugging Face cache of its own, HF_HUB_OFFLINE=1) with the default recipe (batch 32, micro-batch
#     auto, bf16, SDPA) for 120 steps, per-stage time, memory and disk, register included;
#  2. BLIP-base training throughput, MFU and peak GPU memory: the default recipe, then each lever in turn
#     (micro-batch, determinism, SDPA, compile, fp16) and the original recipe;
#  3. the offline pipeline end to end on the GPU (only where DVC and git are installed).
# Needs the project installed from requirements-cuda.lock (README) on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh 2>&1 | tee gpu-benchmark.log
# On a machine without one it checks what it can (the project imports, DVC and git) and stops before its
# first GPU step, exit 2.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
python -c "import fashioncap.train, benchmarks.gpu" || { echo "gpu.sh: the project does not import: install it first (README)" >&2; exit 2; }
echo "# dvc: $(command -v dvc || echo 'not installed: the pipeline steps are skipped'); git: $(command -v git || echo 'not installed')"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device here (torch $(python -c 'import torch; print(torch.__version__)')): stopping before the first GPU step. Run it on a machine with an NVIDIA GPU and the CUDA lock installed." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

started=$(date +%s)
without_dvc=$(command -v dvc >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 || echo --without-dvc)
timeout 330 python -m fashioncap.cli rehearse --size full --keep $without_dvc --hf-home "${TMPDIR:-/tmp}/fashioncap-hf-standins" \
  --set train.batch_size=32 --set train.max_steps=120 --set train.eval_every=60 \
  --set train.checkpoint_every=60 --set train.eval_samples=32 --set train.log_every=20 --set train.num_workers=2 \
  --set generate.batch_size=16 --set evaluate.max_items=40 || echo "# the rehearsal failed"
python - <<'PY' || true
import json, pathlib
work = pathlib.Path(json.load(open("reports/rehearsal-full.json"))["worktree"])  # the rehearsal's own work tree
train, ev = json.load(open(work / "metrics/train.json")), json.load(open(work / "metrics/eval.json"))
print(json.dumps({"rehearsal_train": train, "rehearsal_test_items": ev["test_items"]}))
PY
echo "# full-size rehearsal: $(( $(date +%s) - started )) s"

started=$(date +%s)
timeout 150 python -m benchmarks.gpu || echo "# the training benchmark stopped early"
echo "# training benchmark: $(( $(date +%s) - started )) s"

if [ -z "$without_dvc" ]; then
  # the offline pipeline in a throw-away clone (its own DVC cache and MLflow store)
  clone=$(mktemp -d)/clone
  git clone -q --no-hardlinks . "$clone"
  cd "$clone"
  started=$(date +%s)
  timeout 240 dvc exp run -S profile=offline
  echo "# offline pipeline on the GPU: $(( $(date +%s) - started )) s"
  python - <<'PY'
import json
train, ev = json.load(open("metrics/train.json")), json.load(open("metrics/eval.json"))
print(json.dumps({"offline_pipeline": {"train_seconds": train["train_seconds"],
      "samples_per_second": train["samples_per_second"], "test_after_cider_d": ev["after"]["cider_d"],
      "test_after_bleu_4": ev["after"]["bleu_4"]}}))
PY
fi
