#!/usr/bin/env bash
# One device session's measurements (issue "the paper's run in a working day"), as one prepared
# command for the device tool: an H200 with Python 3.12 and torch there, no network.
#
#   device run: bash bench/gpu_session.sh   (carry: .whl; timeout_s 590)
#
# .whl holds what the machine lacks (made here, see docs/gpu.md): diffusers 0.42.1, pydantic
# 2.14.4 (+ pydantic_core for cp312, annotated_types, typing_inspection), importlib_metadata.
# Writes into $OUT (what comes back): gpu_train.json (bench/bench_gpu_train.py: samples/s,
# memory, FLOPs/sample, MFU, profile, checkpoint save/load, eager-vs-compiled loss curves),
# fullsize_gpu.json (bench/fullsize.py on the GPU: every real stage at 2.1's shapes), and their
# logs. Each step has its own time limit, and both JSON files are written as results come, so a
# session cut short keeps what it measured. Copy them to reports/ here.
set -u
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FASHIONDIFF_TRACKING=off
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers, accelerate; print(torch.__version__, diffusers.__version__, transformers.__version__, accelerate.__version__)" >> "$OUT/gpu.txt" 2>&1
df -h /tmp >> "$OUT/gpu.txt" 2>&1

# 1. the training step: full fine-tuning compiled and eager first (the MFU goal), then LoRA and
#    checkpointing, then the 200-step loss curves eager vs compiled (about 6 minutes in all)
timeout 360 python3 bench/bench_gpu_train.py --batch-size 32 --steps 30 --warmup 10 --curve-steps 200 \
  --checkpoints /tmp/bench-checkpoints --out "$OUT/gpu_train.json" \
  --only prior:full:compiled decoder:full:compiled prior:full:eager decoder:full:eager \
         prior:lora4:compiled decoder:lora4:compiled decoder:full+checkpointing:compiled \
  > "$OUT/gpu_train.log" 2>&1
echo "bench_gpu_train: exit $?" >> "$OUT/gpu.txt"
rm -rf /tmp/bench-checkpoints

# 2. every stage at 2.1's real shapes (random weights): embed, both trainings, evaluate at
#    diffusion_steps 500 (about 3 minutes)
timeout 200 python3 bench/fullsize.py --device cuda --batch-size 32 --bf16 --trainable all --steps 500 \
  --prompts 4 --products 16 --work /tmp/fullsize --report "$OUT/fullsize_gpu.json" > "$OUT/fullsize.log" 2>&1
echo "fullsize: exit $?" >> "$OUT/gpu.txt"
tail -c 3000 "$OUT/gpu_train.log"
cat "$OUT/gpu.txt"
