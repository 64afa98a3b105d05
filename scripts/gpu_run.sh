#!/usr/bin/env bash
# The one prepared GPU session (see README "Timings on a GPU"): trains the shipped teacher and
# times the default from-scratch pipeline. Writes results under $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a $OUT/gpu.txt
# A. the shipped teacher: longer and with a larger batch than the CPU default
T0=$(date +%s)
python3 train_toy.py --from-scratch --teacher-only --run-dir /tmp/teacher_gpu \
  --set teacher_steps=12000 batch=64 2>&1 | tail -5
echo "teacher_gpu seconds $(( $(date +%s) - T0 ))" | tee -a $OUT/gpu.txt
cp /tmp/teacher_gpu/teacher.pt $OUT/teacher.pt; cp /tmp/teacher_gpu/teacher.gif $OUT/teacher.gif
cp /tmp/teacher_gpu/metrics.jsonl $OUT/teacher_metrics.jsonl
# B. the default from-scratch pipeline (toy preset), timed per stage, until the time runs out
T0=$(date +%s)
timeout ${B_LIMIT:-330} python3 train_toy.py --from-scratch --run-dir /tmp/toy_gpu 2>&1 | tail -12
echo "from_scratch seconds $(( $(date +%s) - T0 ))" | tee -a $OUT/gpu.txt
cp /tmp/toy_gpu/metrics.jsonl $OUT/toy_metrics.jsonl 2>/dev/null
grep '"event"' /tmp/toy_gpu/metrics.jsonl | tee -a $OUT/gpu.txt
