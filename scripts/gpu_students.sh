#!/usr/bin/env bash
# Second GPU session: the sampler benchmark on the GPU, then the two students again with a 4x
# larger DMD batch (a training-budget lever), from the CPU run's ODE init (runs/toy_s0/ode_init.pt).
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/bench_gpu.txt
timeout 45 python3 sample.py bench --device cuda --repeats 1 --blocks 16 2>&1 | tee -a $OUT/bench_gpu.txt
for s in hiar self_forcing; do
  mkdir -p /tmp/g_$s && cp runs/toy_s0/ode_init.pt /tmp/g_$s/ode_init.pt
  timeout 330 python3 train_toy.py --run-dir /tmp/g_$s --students $s --set dmd_batch=32 \
    --ship $OUT > $OUT/train_$s.log 2>&1 &
done
wait
for s in hiar self_forcing; do grep '"event"' /tmp/g_$s/metrics.jsonl; tail -2 $OUT/train_$s.log; done
ls -la $OUT
