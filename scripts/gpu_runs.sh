#!/usr/bin/env bash
# The one-device samplers' speed (scripts/bench.py --only onedevice: the GPU column of
# docs/streaming.md, in logs.tar as bench_onedevice.log), then the long-video levers in one GPU
# call, every run its own process, side by side: 48-frame
# rollouts (both orders, with and without the sink, seed 0) and Causal Forcing's ODE init with
# the nine matched students on it (seeds 0-2). On this 2-core CPU that is ~4 h; tried here with
# PRESET=smoke DEVICE=cpu (the test suite runs it so), not yet on a GPU.
#   OUT=/tmp/out bash scripts/gpu_runs.sh                  # on the GPU machine
#   PRESET=smoke DEVICE=cpu OUT=/tmp/out bash scripts/gpu_runs.sh   # the same, tiny, to try it
# Stops every run at BUDGET seconds and packs what is finished into $OUT (small checkpoints from
# --ship, logs, metrics); runs/gpu keeps the rest, and rerunning resumes it.
set -u
P=${PRESET:-toy}; D=${DEVICE:-cuda}; OUT=${OUT:-/tmp/out}; R=runs/gpu
A="--preset $P --device $D"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" $R
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $R/gpu.txt 2>&1

# 0. The one-device samplers (block-major, step-major, the pipeline, the wavefront), GPU alone
timeout 150 python3 scripts/bench.py $A --only onedevice > $R/bench_onedevice.log 2>&1
end=$(( $(date +%s) + ${BUDGET:-420} ))
left() { echo $(( end - $(date +%s) )); }

# 1. 48-frame rollouts (4 windows) from the shipped ODE init, seed 0, both orders, +/- the sink
for o in hiar self_forcing; do for sk in false true; do
  python3 train_toy.py $A --run-dir $R/r48_sink${sk}_$o --students $o \
    --set rollout_frames=48 sink=$sk --ship $R/ship_r48_sink$sk > $R/r48_sink${sk}_$o.log 2>&1 &
done; done

# 2. Causal Forcing's ODE init: AR teacher, teacher-forced ODE pairs, ODE init (seed 0) ...
timeout $(left) python3 train_toy.py $A --run-dir $R/c0 --students "" \
  --set init_teacher=causal --ship $R/ship_c0 > $R/c0.log 2>&1
# ... and the nine matched students on it
for s in 0 1 2; do for o in hiar hiar_no_fkl self_forcing; do
  python3 train_toy.py $A --seed $s --init-from $R/c0 --run-dir $R/c_${o}_s$s --students $o \
    --set init_teacher=causal --ship $R/ship_c_s$s > $R/c_${o}_s$s.log 2>&1 &
done; done

while [ -n "$(jobs -rp)" ] && [ "$(left)" -gt 0 ]; do sleep 2; done
kill $(jobs -rp) 2>/dev/null; wait
for f in $R/*/metrics.jsonl; do cp "$f" "$R/$(basename "$(dirname "$f")").jsonl"; done
tar -cf "$OUT/causal_s0.tar" -C $R $(cd $R && ls -d ship_c0 ship_c_s0 2>/dev/null)
tar -cf "$OUT/causal_s12.tar" -C $R $(cd $R && ls -d ship_c_s1 ship_c_s2 2>/dev/null)
tar -cf "$OUT/r48.tar" -C $R $(cd $R && ls -d ship_r48_* 2>/dev/null)
tar -cf "$OUT/logs.tar" -C $R $(cd $R && ls *.log *.jsonl gpu.txt 2>/dev/null)
tail -n 2 $R/*.log
