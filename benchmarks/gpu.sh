#!/usr/bin/env bash
# GPU figures in one go (under 8 minutes on one H100): BLIP-base training throughput in bf16 vs fp32 vs
# the original recipe, MFU and peak GPU memory at batch 8 and 32, then the offline pipeline on the GPU.
# Needs the project installed (pip install -r requirements.txt) on a machine with an NVIDIA GPU.
#   bash benchmarks/gpu.sh 2>&1 | tee gpu-benchmark.log
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
started=$(date +%s)
timeout 330 python -m benchmarks.gpu
echo "# training benchmark: $(( $(date +%s) - started )) s"

# the offline pipeline end to end on the GPU, in a throw-away clone (its own DVC cache and MLflow store)
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
