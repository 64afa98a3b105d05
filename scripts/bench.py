"""Sampler speed and memory, as ratios measured in one run on this machine (asserts nothing).

    python scripts/bench.py                    # every part, ~10 min on the 2-core CPU
    python scripts/bench.py --only stream      # just the long-video table (per-frame time, RSS)
    python scripts/bench.py --only train       # a training step, this model vs main's (~1 min)
    python scripts/bench.py --only onedevice   # the one-device samplers at batch 1 and 8 (~2 min)
    python scripts/bench.py --only onedevice train     # both, as docs/streaming.md reports them

1. Throughput and time to the first finished block of every sampler (block-major, step-major
   literal / streaming / fused, pipelined with S streams), on 1 and 2 threads.
2. Long videos: per-frame time and peak memory at 1×, 10× and 100× the training length for each
   streaming sampler, each in a fresh process (peak RSS, or peak CUDA memory on a GPU).
3. `python sample.py` itself at 600 and 6000 frames: peak RSS of the whole command.
4. A training step (flow-matching loss, forward + backward, 12 frames) of this model against
   hiar.py at an earlier revision (`--before`, git; default: main before adaLN per frame),
   the same weights, interleaved.
5. One device: block-major against step-major (fused; at t_j, no write pass), the two-stream
   pipeline and the wavefront (an anti-diagonal a batched pass), at batch 1 and 8 on 1 and 2
   threads, the samplers of each setting interleaved; ratios to block-major in that setting.
The weights are random: speed and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def one_run(make_stream, dev):
    """(total time, time to the first block) of consuming one block stream."""
    _sync(dev)
    t0, first = time.perf_counter(), None
    for _ in make_stream():
        if first is None:
            _sync(dev)
            first = time.perf_counter() - t0
    _sync(dev)
    return time.perf_counter() - t0, first


def stream_timed(make_stream, dev, repeats: int):
    """Best-of-`repeats` (total time, time to the first block) of consuming a block stream."""
    list(make_stream())                                                  # warm-up
    return min(one_run(make_stream, dev) for _ in range(repeats))


def throughput(args, cfg, dev):
    torch.manual_seed(0)
    model = hiar.VideoDiT(cfg).eval().to(dev)
    F = args.blocks * cfg.block
    noise = hiar.Noise(cfg, range(args.batch), dev)
    T = args.threads
    rows = [
        ("block-major", T, lambda: hiar.block_major(model, noise, F)),
        ("step-major, Alg. 1 loop", T, lambda: [hiar.sample_step_major(model, noise, F)]),
        ("step-major, streaming", T, lambda: hiar.step_major(model, noise, F)),
        ("step-major, streaming, fused", T, lambda: hiar.step_major(model, noise, F, fused=True)),
        (f"pipelined S=2 ({T // 2} thread each)", T,
         lambda: hiar.pipelined(model, noise, F, streams=2, threads_per_stream=T // 2)),
        (f"pipelined S=2, fused ({T // 2} thread each)", T,
         lambda: hiar.pipelined(model, noise, F, streams=2, threads_per_stream=T // 2,
                                fused=True)),
        ("block-major, 1 thread", 1, lambda: hiar.block_major(model, noise, F)),
        ("step-major, streaming, 1 thread", 1, lambda: hiar.step_major(model, noise, F)),
        ("step-major, streaming, fused, 1 thread", 1,
         lambda: hiar.step_major(model, noise, F, fused=True)),
    ]
    print(f"## 1. Throughput: batch {args.batch}, N = {args.blocks} blocks of {cfg.block} "
          f"frames, K = {cfg.K}, {dev.type}, best of {args.repeats}\n")
    print("| sampler | threads | frames/s | time to first block (s) | vs block-major |")
    print("|---|---|---|---|---|")
    res, before = {}, torch.get_num_threads()
    with torch.no_grad():
        for name, threads, make in rows:
            torch.set_num_threads(threads)
            total, first = stream_timed(make, dev, args.repeats)
            res[name] = (total, first)
            print(f"| {name} | {threads} | {F * args.batch / total:.1f} | {first:.3f} | "
                  f"{res[rows[0][0]][0] / total:.2f}x |", flush=True)
    torch.set_num_threads(before)
    N = args.blocks
    ideal = N * 2 / (N + 2 - 1)
    eff = res["step-major, streaming, fused, 1 thread"][0] / res[rows[5][0]][0]
    print(f"\n2-stream pipeline (fused) over streaming step-major (fused) on 1 thread: {eff:.2f}x; "
          f"ideal N*S/(N+S-1) = {ideal:.2f}x -> {100 * eff / ideal:.0f}% of ideal")
    ratio = res["step-major, streaming, 1 thread"][1] / res["block-major, 1 thread"][1]
    print(f"time to first block, streaming step-major / block-major, 1 thread: {ratio:.2f} "
          "(target <= 2)")
    ratio_f = res["step-major, streaming, fused, 1 thread"][1] / res["block-major, 1 thread"][1]
    print(f"  (fused: {ratio_f:.2f}; the Alg. 1 loop finishes block 0 only with the whole "
          f"video: {res['step-major, Alg. 1 loop'][1]:.2f} s)")


def probe(args):
    """Child process: per-frame time and peak memory of one long video, blocks dropped as they
    come (as sample.py does)."""
    cfg, dev = hiar.Config.preset(args.preset), torch.device(args.device)
    torch.manual_seed(0)
    model = hiar.VideoDiT(cfg).eval().to(dev)
    torch.set_num_threads(args.threads)
    frames, sampler = int(args.probe[0]), args.probe[1]
    noise = hiar.Noise(cfg, range(args.batch), dev)
    make = {"block": lambda F: hiar.block_major(model, noise, F),
            "step": lambda F: hiar.step_major(model, noise, F),
            "pipelined": lambda F: hiar.pipelined(model, noise, F, streams=2,
                                                  threads_per_stream=max(1, args.threads // 2)),
            "wavefront": lambda F: hiar.wavefront(model, noise, F)}
    with torch.no_grad():
        for _ in make[sampler](cfg.frames):                           # warm-up: 1× length
            pass
        _sync(dev)
        t = last = time.perf_counter()
        per_block = []                                 # the median resists bursts of other load
        for _ in make[sampler](frames):
            _sync(dev)
            now = time.perf_counter()
            per_block.append(now - last)
            last = now
        took = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    median = sorted(per_block)[len(per_block) // 2] / cfg.block
    print(json.dumps({"per_frame_ms": 1000 * took / frames, "median_ms": 1000 * median,
                      "peak_mb": peak}))


def peak_rss_of(cmd, env) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of a command run as a child process (os.wait4)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        if status != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def long_videos(args, cfg):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    mem = "peak CUDA memory (MB)" if args.device == "cuda" else "peak RSS (MB)"
    print(f"\n## 2. Long videos: batch {args.batch}, {args.threads} threads, each length in a "
          f"fresh process\n")
    print(f"| sampler | video length | per-frame time (ms): mean, median of blocks | {mem} |")
    print("|---|---|---|---|")
    per = {}
    for sampler in ("block", "step", "pipelined", "wavefront"):
        for mult in (1, 10, 100):
            out = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                 "--device", args.device, "--threads", str(args.threads), "--probe",
                 str(mult * cfg.frames), sampler],
                capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per[sampler, mult] = r
            print(f"| {sampler} | {mult}x ({mult * cfg.frames} frames) | "
                  f"{r['per_frame_ms']:.2f}, {r['median_ms']:.2f} | {r['peak_mb']:.0f} |",
                  flush=True)
    print()
    for sampler in ("block", "step", "pipelined", "wavefront"):
        a, b = per[sampler, 10], per[sampler, 100]
        print(f"{sampler}: 100x / 10x peak memory {b['peak_mb'] / a['peak_mb']:.3f}, per-frame "
              f"time {b['median_ms'] / a['median_ms']:.3f} (median; mean "
              f"{b['per_frame_ms'] / a['per_frame_ms']:.3f}) (targets: within 10 %)")


def sample_cli(args):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cfg = hiar.Config.preset("smoke") if args.preset == "smoke" else hiar.Config()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "m.pt"
        torch.save({"config": cfg.to_dict(), "model": hiar.VideoDiT(cfg).state_dict(),
                    "stage": "bench", "order": "block"}, ckpt)
        print("\n## 3. `python sample.py --sampler block --num 8 --npy …` (random weights), "
              "peak RSS of the whole command\n")
        print("| frames | peak RSS (MB) | wall (s) |")
        print("|---|---|---|")
        res = {}
        for frames in (600, 6000):
            cmd = [sys.executable, "sample.py", "--ckpt", str(ckpt), "--sampler", "block",
                   "--num", "8", "--frames", str(frames), "--gif", "",
                   "--npy", str(Path(tmp) / "v.npy")]
            res[frames] = peak_rss_of(cmd, env)
            print(f"| {frames} | {res[frames][0]:.0f} | {res[frames][1]:.0f} |", flush=True)
        print(f"\n6000 / 600 frames: peak RSS {res[6000][0] / res[600][0]:.3f}")


def hiar_at(rev: str):
    """hiar.py as it was at git revision `rev`, imported as its own module."""
    text = subprocess.run(["git", "show", f"{rev}:hiar.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "hiar_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("hiar_before", path)
    module = sys.modules["hiar_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_step(args, cfg, dev):
    """Forward + backward of the flow-matching loss (the teacher's and the critic's step; the
    student's rollouts run the same model), this hiar.py against `args.before`'s, same weights."""
    old = hiar_at(args.before)
    torch.manual_seed(0)
    new_model = hiar.VideoDiT(cfg).to(dev)
    for p in new_model.parameters():                   # adaLN-zero would leave half the net idle
        torch.nn.init.normal_(p, std=0.05)
    old_model = old.VideoDiT(old.Config(**cfg.to_dict())).to(dev)
    old_model.load_state_dict(new_model.state_dict())
    torch.set_num_threads(args.threads)
    print(f"\n## 4. Training step: flow-matching loss, forward + backward, {cfg.frames} frames, "
          f"{args.threads} threads, best of {args.repeats} (interleaved); before = hiar.py at "
          f"{args.before}\n")
    print("| batch | before (ms) | now (ms) | speed-up | max |v_hat before − now| |")
    print("|---|---|---|---|---|")
    for B in (8, 16):
        g = torch.Generator().manual_seed(B)
        x0 = torch.randn(B, cfg.frames, 3, cfg.size, cfg.size, generator=g).to(dev)
        eps, sigma = torch.randn(x0.shape, generator=g).to(dev), torch.rand(B, generator=g).to(dev)
        lab = torch.arange(B) % cfg.labels
        with torch.no_grad():                          # the same function, to float rounding
            diff = (old_model(x0, sigma, lab) - new_model(x0, sigma, lab)).abs().max().item()
        best = {}
        for _ in range(args.repeats):
            for name, module, model in (("before", old, old_model), ("now", hiar, new_model)):
                module.flow_loss(model, x0, sigma, eps, lab).backward()          # warm-up
                _sync(dev)
                t = time.perf_counter()
                for _ in range(3):
                    module.flow_loss(model, x0, sigma, eps, lab).backward()
                _sync(dev)
                best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / 3)
        print(f"| {B} | {1000 * best['before']:.0f} | {1000 * best['now']:.0f} | "
              f"{best['before'] / best['now']:.2f}x | {diff:.1e} |", flush=True)


def one_device(args, cfg, dev):
    torch.manual_seed(0)
    model = hiar.VideoDiT(cfg).eval().to(dev)
    F, before = args.blocks * cfg.block, torch.get_num_threads()
    print(f"\n## 5. One device: N = {args.blocks} blocks of {cfg.block} frames, K = {cfg.K}, "
          f"{dev.type}, best of {args.repeats}, the samplers of a setting interleaved\n")
    print("| batch | threads | sampler | frames/s | time to first block (ms) | frames/s vs "
          "block-major | first block vs block-major |")
    print("|---|---|---|---|---|---|---|")
    for B, T in ((1, 1), (1, 2), (8, 1), (8, 2)):
        noise = hiar.Noise(cfg, range(B), dev)
        rows = {"block-major": lambda: hiar.block_major(model, noise, F),
                "step-major, fused": lambda: hiar.step_major(model, noise, F, fused=True),
                "step-major, t_j (no write pass)":
                    lambda: hiar.step_major(model, noise, F, context_t="current"),
                "pipelined S=2, fused (1 thread each)":
                    lambda: hiar.pipelined(model, noise, F, streams=2, fused=True),
                "wavefront": lambda: hiar.wavefront(model, noise, F),
                "wavefront, t_j": lambda: hiar.wavefront(model, noise, F, context_t="current")}
        if T == 1:                                     # two streams need two threads
            del rows["pipelined S=2, fused (1 thread each)"]
        torch.set_num_threads(T)
        best = {}
        with torch.no_grad():
            for make in rows.values():                 # warm-up
                list(make())
            for _ in range(args.repeats):
                for name, make in rows.items():
                    best[name] = min(best.get(name, (1e9, 0)), one_run(make, dev))
        base = best["block-major"]
        for name, (total, first) in best.items():
            print(f"| {B} | {T} | {name} | {F * B / total:.1f} | {1000 * first:.1f} | "
                  f"{base[0] / total:.2f}x | {first / base[1]:.2f} |", flush=True)
    torch.set_num_threads(before)


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch", type=int, default=8, help="videos generated together")
    p.add_argument("--blocks", type=int, default=16, help="blocks per video (N) in part 1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="total CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--only", choices=["throughput", "stream", "cli", "train", "onedevice"],
                   nargs="+", default=None, help="run only these parts")
    p.add_argument("--before", default="f573fce", help="git revision of hiar.py that part 4 "
                   "compares with (default: main before adaLN per frame)")
    p.add_argument("--probe", nargs=2, metavar=("FRAMES", "SAMPLER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sample.check(args.preset in hiar.PRESETS, "--preset", args.preset,
                 f"choose one of {sorted(hiar.PRESETS)}")
    for flag in ("batch", "blocks", "repeats", "threads"):
        sample.check_int(f"--{flag}", getattr(args, flag))
    if args.probe:
        return probe(args)
    cfg = hiar.Config.preset(args.preset)
    dev = sample.pick_device(args.device)
    print(f"# scripts/bench.py: preset {args.preset}, {dev.type}, torch {torch.__version__}\n")
    if args.only is None or "throughput" in args.only:
        throughput(args, cfg, dev)
    if args.only is None or "stream" in args.only:
        long_videos(args, cfg)
    if (args.only is None or "cli" in args.only) and dev.type == "cpu":
        sample_cli(args)
    if args.only is None or "train" in args.only:
        train_step(args, cfg, dev)
    if args.only is None or "onedevice" in args.only:
        one_device(args, cfg, dev)


if __name__ == "__main__":
    sample.run_cli(main)
