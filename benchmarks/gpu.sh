#!/usr/bin/env bash
# GPU figures in one go, printed and written to reports/:
#  1. the real job at full size: `fashioncap rehearse --size full` (BLIP-base and H&M-shaped stand-ins in
#     a Hugging Face cache of its own, HF_HUB_OFFLINE=1) with the default recipe (batch 32, micro-batch
#     auto, bf16, SDPA) for 120 steps, per-stage time, memory and disk, register included;
#  2. BLIP-base training throughput, MFU and peak GPU memory at batch 8 and 32: the default recipe, then each
#     lever in turn (micro-batch, determinism, SDPA, compile, fp16, fp32) and the original recipe;
#  3. the offline pipeline end to end on the GPU (only where DVC and git are installed).
# Needs the project installed from requirements-cuda.lock (README) on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh 2>&1 | tee gpu-benchmark.log
# On a machine without one it checks what it can (the project imports, DVC and git) and stops before its
# first GPU step, exit 2. `--dry-run` runs every step on the CPU instead, at tiny shapes (the shrunk rehearsal,
# the offline model at batch 2 and 4, the offline pipeline at the test suite's tiny size): the script's own
# code end to end, without a GPU, in a few minutes (CI runs it); none of its figures is a GPU's. A step that
# fails does not stop the steps after it; the script then exits 1.
set -euo pipefail
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") dry_run="" ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
python -c "import fashioncap.train, benchmarks.gpu" || { echo "gpu.sh: the project does not import: install it first (README)" >&2; exit 2; }
echo "# dvc: $(command -v dvc || echo 'not installed: the pipeline steps are skipped'); git: $(command -v git || echo 'not installed')"
if [ -n "$dry_run" ]; then
  echo "# dry run: every step on the CPU at tiny shapes; no figure here is a GPU's"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'on the CPU')"
elif ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device here (torch $(python -c 'import torch; print(torch.__version__)')): stopping before the first GPU step. Run it on a machine with an NVIDIA GPU and the CUDA lock installed, or with --dry-run on the CPU." >&2
  exit 2
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
fi
failed=0

started=$(date +%s)
without_dvc=$(command -v dvc >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 || echo --without-dvc)
if [ -n "$dry_run" ]; then  # the shrunk stand-ins with the rehearsal's own tiny settings
  size=shrunk recipe=()
else
  size=full recipe=(--set train.batch_size=32 --set train.max_steps=120 --set train.eval_every=60
    --set train.checkpoint_every=60 --set train.eval_samples=32 --set train.log_every=20 --set train.num_workers=2
    --set generate.batch_size=16 --set evaluate.max_items=40)
fi
timeout 330 python -m fashioncap.cli rehearse --size $size --keep $without_dvc \
  --hf-home "${TMPDIR:-/tmp}/fashioncap-hf-standins" "${recipe[@]}" || { echo "# the rehearsal failed"; failed=1; }
SIZE=$size python - <<'PY' || failed=1
import json, os, pathlib
work = pathlib.Path(json.load(open(f"reports/rehearsal-{os.environ['SIZE']}.json"))["worktree"])  # its own tree
train, ev = json.load(open(work / "metrics/train.json")), json.load(open(work / "metrics/eval.json"))
print(json.dumps({"rehearsal_train": train, "rehearsal_test_items": ev["test_items"]}))
PY
echo "# $size rehearsal: $(( $(date +%s) - started )) s"

started=$(date +%s)
# two batches of seven settings, a cold torch.compile each: allow for both compiles
timeout 360 python -m benchmarks.gpu ${dry_run:+--dry-run} || { echo "# the training benchmark stopped early"; failed=1; }
echo "# training benchmark: $(( $(date +%s) - started )) s"

if [ -z "$without_dvc" ]; then
  # the offline pipeline in a throw-away clone (its own DVC cache and MLflow store)
  clone=$(mktemp -d)/clone
  git clone -q --no-hardlinks . "$clone"
  cd "$clone"
  started=$(date +%s)
  if [ -n "$dry_run" ]; then  # the test suite's tiny size (tests/conftest.py TINY_OVERRIDES, in short)
    tiny=(-S data.synthetic.items=150 -S data.synthetic.render_size=64 -S model.image_size=32
      -S model.scratch.patch_size=8 -S model.scratch.vision_layers=1 -S model.scratch.text_layers=1
      -S model.scratch.vision_hidden=32 -S model.scratch.text_hidden=32 -S model.scratch.vision_intermediate=64
      -S model.scratch.text_intermediate=64 -S train.batch_size=8 -S train.max_steps=12 -S train.warmup_steps=2
      -S train.eval_every=6 -S train.checkpoint_every=6 -S train.eval_samples=8 -S train.num_workers=0
      -S evaluate.meteor=false)
  else
    tiny=()
  fi
  timeout 240 dvc exp run -S profile=offline "${tiny[@]}" || failed=1
  echo "# offline pipeline $([ -n "$dry_run" ] && echo "(dry run, on the CPU)" || echo "on the GPU"): $(( $(date +%s) - started )) s"
  python - <<'PY' || failed=1
import json
train, ev = json.load(open("metrics/train.json")), json.load(open("metrics/eval.json"))
print(json.dumps({"offline_pipeline": {"train_seconds": train["train_seconds"],
      "samples_per_second": train["samples_per_second"], "test_after_cider_d": ev["after"]["cider_d"],
      "test_after_bleu_4": ev["after"]["bleu_4"]}}))
PY
fi
exit "$failed"
