"""Sample long videos from trained checkpoints, write a labelled GIF, print drift metrics.

    python sample.py                                  # block-major vs step-major, shipped HiAR
    python sample.py --ckpt self_forcing --sampler block --frames 192 --gif sf.gif
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import hiar

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "checkpoints"

# ------------------------------------------------------------------------------------------------
# Shared by the scripts: one error type, device choice, one checkpoint loader
# ------------------------------------------------------------------------------------------------


class CLIError(RuntimeError):
    """A failure the user sees as one line: a bad flag value, a missing or foreign file, a NaN."""


def pick_device(name: str | None = None) -> torch.device:
    """cuda > mps > cpu unless `name` says otherwise."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise CLIError(f"--device {name!r} is not a device ({e})") from None
        if dev.type == "cuda" and (not torch.cuda.is_available()
                                   or (dev.index or 0) >= torch.cuda.device_count()):
            raise CLIError(f"--device {name}: that CUDA device is not available here")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                      and torch.backends.mps.is_available()):
            raise CLIError(f"--device {name}: MPS is not available here")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise CLIError(f"--device {name}: choose cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_checkpoint(path) -> dict:
    """torch.load with weights_only=True; a missing, truncated or foreign file is a CLIError."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"checkpoint {path} could not be read ({first})") from None


def model_from_checkpoint(ck: dict, path, key: str = "model") -> hiar.VideoDiT:
    """The network stored in a checkpoint dict (weights under `key`, else "model")."""
    try:
        model = hiar.VideoDiT(hiar.Config.from_dict(ck["config"]))
        model.load_state_dict({k: v.float() for k, v in ck.get(key, ck["model"]).items()})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"checkpoint {path} does not hold a model of this code ({first})") from None
    return model

# ------------------------------------------------------------------------------------------------
# Video helpers: uint8 frames, labelled grids, GIFs
# ------------------------------------------------------------------------------------------------


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, T, 3, H, W) in [-1, 1] → (B, T, H, W, 3) uint8."""
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).numpy()


def _label(text: str, width: int, height: int = 11) -> np.ndarray:
    """A strip with `text` in white on dark grey (PIL comes with imageio)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (40, 40, 40))
    ImageDraw.Draw(img).text((2, 0), text, fill=(255, 255, 255))
    return np.asarray(img)


def grid_frames(rows: dict, scale: int = 4, per_row: int = 1, gap: int = 2) -> np.ndarray:
    """Stack labelled rows of videos into one video. rows: {label: uint8 (n, T, H, W, 3)}, each
    row shows `per_row` videos side by side. Returns (T, H', W', 3) uint8."""
    T = min(v.shape[1] for v in rows.values())
    blocks = []
    for label, v in rows.items():
        v = v[:per_row, :T].repeat(scale, 2).repeat(scale, 3)        # (n, T, sH, sW, 3)
        pad = np.zeros((v.shape[0], T, v.shape[2], gap, 3), np.uint8)
        row = np.concatenate([np.concatenate([x, p], 2) for x, p in zip(v, pad)], 2)
        text = _label(label, row.shape[2])
        strip = np.broadcast_to(text, (T,) + text.shape)
        blocks += [strip, row, np.zeros((T, gap, row.shape[2], 3), np.uint8)]
    width = max(b.shape[2] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, 0), (0, width - b.shape[2]), (0, 0))) for b in blocks]
    return np.concatenate(blocks, 1)


def save_gif(path, frames: np.ndarray, fps: int = 8):
    import imageio.v2 as imageio
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(frames), duration=1 / fps, loop=0)


# ------------------------------------------------------------------------------------------------
# Drift metrics: toy ground truth instead of the paper's image-quality networks (the paper's drift metric:
# split a long video into 5 segments; drift of a measure = slope of a linear fit across them)
# ------------------------------------------------------------------------------------------------

FG = 0.25     # a pixel is foreground if its brightest channel exceeds this (RGB in [0, 1])


def _rgb(video):
    """(B, T, 3, H, W) in [-1, 1] → (B, T, H, W, 3) in [0, 1]."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2)


def _fg_mean(x, fg):
    """Mean of x (B, T, H, W) over foreground pixels per frame (0 where a frame has none)."""
    return (x * fg).sum((-1, -2)) / fg.sum((-1, -2)).clamp(min=1)


def palette_error(video):
    """Per frame: how far foreground pixels sit from the toy's colour rays {t·c : t ∈ [0, 1]}
    (a blob is a palette colour c scaled by a Gaussian). 0 for the data, up for off-palette."""
    p = _rgb(video)                                                       # (B, T, H, W, 3)
    c = hiar.PALETTE.to(p.device)                                         # (P, 3)
    t = ((p @ c.T) / (c * c).sum(-1)).clamp(0, 1)                         # (B, T, H, W, P)
    d = (p[..., None, :] - t[..., None] * c).norm(dim=-1).amin(-1)        # (B, T, H, W)
    return _fg_mean(d, p.amax(-1) > FG)


def saturation(video):
    """Mean HSV saturation (max − min) / max over foreground pixels, per frame."""
    p = _rgb(video)
    hi, lo = p.amax(-1), p.amin(-1)
    return _fg_mean((hi - lo) / hi.clamp(min=1e-6), hi > FG)


def brightness(video):
    """Mean HSV value (brightest channel) over all pixels, per frame."""
    return _rgb(video).amax(-1).mean((-1, -2))


def foreground(video):
    """Fraction of foreground pixels per frame: the shapes' total area (conserved in the data)."""
    return (_rgb(video).amax(-1) > FG).float().mean((-1, -2))


def sharpness(video):
    """Variance of the Laplacian of the grey image, per frame (falls as shapes blur)."""
    g = _rgb(video).mean(-1)                                              # (B, T, H, W)
    B, T, H, W = g.shape
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=g.device)[None, None]
    lap = torch.nn.functional.conv2d(g.reshape(B * T, 1, H, W), k)
    return lap.reshape(B, T, -1).var(-1)


def flicker(video):
    """|change of mean brightness| from the previous frame (0 for the first frame)."""
    v = brightness(video)
    return torch.cat([torch.zeros_like(v[:, :1]), (v[:, 1:] - v[:, :-1]).abs()], 1)


def _colour_mass(video):
    """Each foreground pixel given to its nearest palette colour (by angle): per frame and colour
    the total intensity (B, T, P), and the intensity-weighted maps (B, T, H, W, P)."""
    p = _rgb(video)
    c = hiar.PALETTE.to(p.device)
    hi = p.amax(-1)
    cos = (p @ c.T) / (p.norm(dim=-1, keepdim=True) * c.norm(dim=-1) + 1e-6)   # (B,T,H,W,P)
    w = torch.nn.functional.one_hot(cos.argmax(-1), len(c)) * (hi * (hi > FG))[..., None]
    return w.sum((2, 3)), w


def colours(video):
    """How many palette colours are present (at least a blob's worth of intensity), per frame.
    The data has `shapes` distinct colours in every frame; a collapsing model has fewer."""
    return (_colour_mass(video)[0] > 1.0).sum(-1).float()


def speed(video):
    """Estimated speed of the shapes (pixels / frame): each foreground pixel is given to its
    nearest palette colour; per colour the intensity-weighted centroid is tracked between frames.
    Per frame the mean over colours seen in both frames (0 for the first frame)."""
    mass, w = _colour_mass(video)                                          # (B, T, P), maps
    H, W = w.shape[2:4]
    ys, xs = torch.meshgrid(torch.arange(H, device=w.device),
                            torch.arange(W, device=w.device), indexing="ij")
    cx = (w * xs[..., None]).sum((2, 3)) / mass.clamp(min=1e-6)
    cy = (w * ys[..., None]).sum((2, 3)) / mass.clamp(min=1e-6)
    seen = mass > 0.5                                                      # a blob's worth
    both = seen[:, 1:] & seen[:, :-1]
    step = ((cx[:, 1:] - cx[:, :-1]) ** 2 + (cy[:, 1:] - cy[:, :-1]) ** 2).sqrt()
    v = (step * both).sum(-1) / both.sum(-1).clamp(min=1)
    return torch.cat([torch.zeros_like(v[:, :1]), v], 1)


MEASURES = {"palette_err": palette_error, "saturation": saturation, "brightness": brightness,
            "foreground": foreground, "sharpness": sharpness, "colours": colours, "speed": speed,
            "flicker": flicker}


def segment_means(per_frame, segments: int = 5):
    """(B, T) per-frame values → (B, segments) means over equal consecutive segments."""
    B, T = per_frame.shape
    if T < segments:
        raise ValueError(f"frames={T} is too short for {segments} segments")
    usable = T - T % segments
    return per_frame[:, :usable].reshape(B, segments, -1).mean(-1)


def drift_slope(seg):
    """Slope of the least-squares line through segment values (B, S) against 0..S−1 → (B,)."""
    S = seg.shape[-1]
    x = torch.arange(S, dtype=seg.dtype, device=seg.device) - (S - 1) / 2
    return ((seg - seg.mean(-1, keepdim=True)) * x).sum(-1) / (x * x).sum()


def drift_metrics(video, segments: int = 5) -> dict:
    """{measure: (level (B,), drift (B,))}: level = mean over the whole video, drift = slope of
    its segment means per segment (paper's definition)."""
    out = {}
    for name, fn in MEASURES.items():
        v = fn(video)
        if name in ("speed", "flicker"):       # defined from the second frame on
            v = v[:, 1:]
        out[name] = (v.mean(-1), drift_slope(segment_means(v, segments)))
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
SAMPLER_NAMES = ("block", "step", "pipelined")


class SampleError(RuntimeError):
    pass


def resolve_ckpt(name: str) -> Path:
    """A path, or the name of a shipped checkpoint (hiar, self_forcing, hiar_no_fkl, …)."""
    p = Path(name)
    if p.suffix == ".pt" or p.exists():
        if not p.is_file():
            raise SampleError(f"--ckpt {name}: no such file")
        return p
    shipped = HERE / "checkpoints" / f"{name}.pt"
    if not shipped.is_file():
        have = sorted(q.stem for q in (HERE / "checkpoints").glob("*.pt"))
        raise SampleError(f"--ckpt {name}: not a file and not a shipped checkpoint {have}")
    return shipped


def load_student(name: str, device) -> tuple[hiar.VideoDiT, dict]:
    """The sampling weights (EMA where present) and the checkpoint's metadata."""
    path = resolve_ckpt(name)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        cfg = hiar.Config.from_dict(ck["config"])
        model = hiar.VideoDiT(cfg)
        model.load_state_dict(ck["ema"] if "ema" in ck else ck["model"])
    except Exception as e:                     # unreadable, foreign or mismatched file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(f"--ckpt {path}: not a usable checkpoint ({first})") from None
    if ck.get("stage") == "teacher":
        raise SampleError(f"--ckpt {path}: is the bidirectional teacher; sample a student "
                          "(hiar, self_forcing, hiar_no_fkl or a run's student checkpoint)")
    meta = {k: ck[k] for k in ("stage", "order", "fkl_weight", "context_t", "note") if k in ck}
    return model.to(device).eval(), meta


def run_sampler(model, noise, sampler: str, context_t: str, streams: int = 2):
    if sampler == "block":
        return hiar.sample_block_major(model, noise)
    if sampler == "step":
        return hiar.sample_step_major(model, noise, context_t=context_t)
    if sampler == "pipelined":
        if dist.is_available() and dist.is_initialized():
            return hiar.sample_distributed(model, noise, context_t=context_t)
        return hiar.sample_pipelined(model, noise, context_t=context_t, streams=streams)
    raise SampleError(f"--sampler {sampler!r}: choose from {SAMPLER_NAMES}")


def metric_table(videos: dict) -> str:
    """Markdown table: per video set, each measure's mean level and drift (mean ± std over
    videos)."""
    names = list(MEASURES)
    lines = ["| video | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, v in videos.items():
        m = drift_metrics(v)
        cells = []
        for n in names:
            level, slope = m[n]
            cells.append(f"{level.mean():.3f} ({slope.mean():+.4f}±{slope.std():.4f})"
                         if len(slope) > 1 else f"{level.mean():.3f} ({slope.mean():+.4f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nEach cell: mean level (drift = slope per segment over "
                              "5 segments, ± std over videos).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="hiar", help="checkpoint path or shipped name "
                   "(hiar, self_forcing, hiar_no_fkl)")
    p.add_argument("--sampler", default=None,
                   help="block, step or pipelined (default: block and step side by side)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video (default: the config's sample_frames, 8× training)")
    p.add_argument("-n", "--num", type=int, default=4,
                   help="number of videos (under torchrun write -n: it takes --num for its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-t", default="next", help="step-major context level: "
                   "current (t_j), next (t_{j+1}) or clean")
    p.add_argument("--streams", type=int, default=2, help="pipelined: number of streams")
    p.add_argument("--gif", default="samples/sample.gif", help="GIF to write ('' = none)")
    p.add_argument("--npy", default=None, help="write the raw uint8 videos (num, T, H, W, 3)")
    p.add_argument("--pt", default=None, help="write the float videos (num, T, 3, H, W)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: autodetect)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from train_toy import TrainingError, pick_device
    samplers = [args.sampler] if args.sampler else ["block", "step"]
    for s in samplers:
        if s not in SAMPLER_NAMES:
            raise SampleError(f"--sampler {s!r}: choose from {SAMPLER_NAMES}")
    if args.context_t not in hiar.CONTEXT_LEVELS:
        raise SampleError(f"--context-t {args.context_t!r}: choose from {hiar.CONTEXT_LEVELS}")
    if args.num < 1:
        raise SampleError(f"--num {args.num}: must be >= 1")
    try:
        dev = pick_device(args.device)
    except TrainingError as e:
        raise SampleError(str(e)) from None
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            dev = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    model, meta = load_student(args.ckpt, dev)
    cfg = model.cfg
    frames = cfg.sample_frames if args.frames is None else args.frames
    if frames < 1 or frames % cfg.block:
        raise SampleError(f"--frames {frames}: must be a positive multiple of the block "
                          f"size {cfg.block}")
    g = torch.Generator().manual_seed(args.seed)
    data, _ = hiar.moving_shapes(cfg, args.num, g, frames)
    noise = hiar.noise_bank(cfg, args.num, frames, g, dev)
    videos = {"data": data}
    with torch.no_grad():
        for s in samplers:
            label = f"{Path(args.ckpt).stem}: {s if s == 'pipelined' else s + '-major'}"
            videos[label] = run_sampler(model, noise, s, args.context_t, args.streams).cpu()
    if distributed and dist.get_rank() != 0:
        return
    made = dict(zip(samplers, list(videos.values())[1:]))
    for path, write in ((args.npy, lambda p, v: np.save(p, to_uint8(v))),
                        (args.pt, lambda p, v: torch.save(v, p))):
        for s, v in (made.items() if path else []):   # one file per sampler: (num, T, …)
            p = path if len(made) == 1 else str(Path(path).with_stem(f"{Path(path).stem}_{s}"))
            write(p, v)
            print(f"wrote {p}")
    if args.gif:
        save_gif(args.gif, grid_frames({k: to_uint8(v) for k, v in videos.items()},
                                       per_row=min(args.num, 4)))
        print(f"wrote {args.gif}")
    if frames >= 5:
        print(metric_table(videos))


# ------------------------------------------------------------------------------------------------
# Benchmark: python sample.py bench  (prints a table; asserts nothing about time)
# ------------------------------------------------------------------------------------------------

def _timed(fn, threads: int, K: int, repeats: int, dev=torch.device("cpu")):
    """Best-of-`repeats` wall time of fn() with `threads` intra-op threads, and the time at which
    block 0 came out finished (its cell at the last step), via a wrapper around hiar.cell."""
    import time
    torch.set_num_threads(threads)
    real_cell, best = hiar.cell, None
    stamp = {"t0": time.perf_counter(), "first": None}

    def first_block_cell(ctx, x, n, j, *a, **kw):
        out = real_cell(ctx, x, n, j, *a, **kw)
        if n == 0 and j == K - 1 and stamp["first"] is None:
            _sync(dev)
            stamp["first"] = time.perf_counter() - stamp["t0"]
        return out
    hiar.cell = first_block_cell
    try:
        fn()                                                            # warm-up
        for _ in range(repeats):
            _sync(dev)
            stamp.update(t0=time.perf_counter(), first=None)
            fn()
            _sync(dev)
            total = time.perf_counter() - stamp["t0"]
            if best is None or total < best[0]:
                best = (total, stamp["first"])
    finally:
        hiar.cell = real_cell
    return best


def _probe(args):
    """Child process of the benchmark: per-frame time and peak memory of one long sample."""
    import json
    import resource
    import time
    cfg, dev = hiar.Config.preset(args.preset), torch.device(args.device)
    model = hiar.VideoDiT(cfg).eval().to(dev)
    noise = hiar.noise_bank(cfg, args.batch, args.frames, torch.Generator().manual_seed(0), dev)
    held, real_append = [0], hiar.KVCache.append

    def spy(self, layer, k, v, frame):
        real_append(self, layer, k, v, frame)
        held[0] = max(held[0], self.k[layer].shape[-2] // cfg.tokens_per_frame)
    hiar.KVCache.append = spy
    fn = {"block": hiar.sample_block_major, "step": hiar.sample_step_major}[args.sampler]
    with torch.no_grad():
        fn(model, noise[:, :cfg.frames // cfg.block])                  # warm-up: 1x length
        _sync(dev)
        t = time.perf_counter()
        fn(model, noise)
        _sync(dev)
        took = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    print(json.dumps({"per_frame_ms": 1000 * took / args.frames, "peak_mb": peak,
                      "cache_frames": held[0]}))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_main(argv=None):
    import json
    import subprocess
    p = argparse.ArgumentParser(prog="sample.py bench", description="Sampler speed and memory "
                                "(ratios measured in one run on this machine).")
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch", type=int, default=8, help="videos generated together")
    p.add_argument("--blocks", type=int, default=16, help="blocks per video (N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="total CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--probe", nargs=2, metavar=("FRAMES", "SAMPLER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        args.frames, args.sampler = int(args.probe[0]), args.probe[1]
        return _probe(args)
    cfg = hiar.Config.preset(args.preset)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = hiar.VideoDiT(cfg).eval().to(dev)         # speed does not depend on the weights
    K, N, T = cfg.K, args.blocks, args.threads
    noise = hiar.noise_bank(cfg, args.batch, N * cfg.block, torch.Generator().manual_seed(0),
                            dev)
    frames = N * cfg.block * args.batch
    runs = [
        ("block-major, sequential", T, lambda: hiar.sample_block_major(model, noise)),
        ("step-major, sequential", T, lambda: hiar.sample_step_major(model, noise)),
        ("step-major, sequential, fused", T,
         lambda: hiar.sample_step_major(model, noise, fused=True)),
        (f"pipelined S=1 ({T} threads)", T,
         lambda: hiar.sample_pipelined(model, noise, streams=1, threads_per_stream=T)),
        (f"pipelined S=2 ({T // 2} thread each)", T,
         lambda: hiar.sample_pipelined(model, noise, streams=2, threads_per_stream=T // 2)),
        (f"pipelined S=2, fused ({T // 2} thread each)", T,
         lambda: hiar.sample_pipelined(model, noise, streams=2, threads_per_stream=T // 2,
                                       fused=True)),
        ("block-major, sequential, 1 thread", 1, lambda: hiar.sample_block_major(model, noise)),
        ("step-major, sequential, 1 thread", 1, lambda: hiar.sample_step_major(model, noise)),
        ("step-major, sequential, fused, 1 thread", 1,
         lambda: hiar.sample_step_major(model, noise, fused=True)),
    ]
    print(f"# sample.py bench: preset {args.preset}, {dev.type}, batch {args.batch}, "
          f"N={N} blocks of "
          f"{cfg.block} frames, K={K}, best of {args.repeats}\n")
    print("| sampler | threads | frames/s | time to first block (s) | vs block-major |")
    print("|---|---|---|---|---|")
    res = {}
    threads_before = torch.get_num_threads()
    with torch.no_grad():
        for name, threads, fn in runs:
            total, first = _timed(fn, threads, K, args.repeats, dev)
            res[name] = total
            print(f"| {name} | {threads} | {frames / total:.1f} | {first:.3f} | "
                  f"{res[runs[0][0]] / total:.2f}x |", flush=True)
    torch.set_num_threads(threads_before)
    ideal = N * 2 / (N + 2 - 1)
    eff = res["step-major, sequential, 1 thread"] / res[runs[4][0]]
    eff_f = res["step-major, sequential, fused, 1 thread"] / res[runs[5][0]]
    print(f"\n2-stream pipeline over sequential step-major at 1 thread: {eff:.2f}x unfused, "
          f"{eff_f:.2f}x fused; ideal N*S/(N+S-1) = {ideal:.2f}x -> {100 * eff / ideal:.0f}% / "
          f"{100 * eff_f / ideal:.0f}% of ideal")
    print(f"pipelined step-major (fused, S=2) over block-major sequential, {T} threads: "
          f"{res[runs[0][0]] / res[runs[5][0]]:.2f}x")
    mem = "peak CUDA memory (MB)" if dev.type == "cuda" else "peak RSS (MB)"
    print(f"\n| sampler | video length | per-frame time (ms) | {mem} | KV cache (frames) |")
    print("|---|---|---|---|---|")
    per = {}
    for sampler in ("block", "step"):
        for mult in (1, 2, 10):
            out = subprocess.run([sys.executable, __file__, "bench", "--preset", args.preset,
                                  "--batch", str(args.batch), "--device", args.device, "--probe",
                                  str(mult * cfg.frames), sampler],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(T)})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per[sampler, mult] = r["per_frame_ms"]
            print(f"| {sampler}-major | {mult}x ({mult * cfg.frames} frames) | "
                  f"{r['per_frame_ms']:.2f} | {r['peak_mb']:.0f} | {r['cache_frames']} |",
                  flush=True)
    for sampler in ("block", "step"):
        print(f"{sampler}-major per-frame time at 10x / 1x: "
              f"{per[sampler, 10] / per[sampler, 1]:.2f}, 10x / 2x: "
              f"{per[sampler, 10] / per[sampler, 2]:.2f} (the first window's blocks see less "
              "context than every later block)")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["bench"]:
            bench_main(sys.argv[2:])
        else:
            main()
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
