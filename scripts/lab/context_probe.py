"""Does a student keep its context? It continues the teacher's clips by one block.

    python scripts/lab/context_probe.py                        # ODE init and the shipped students
    python scripts/lab/context_probe.py --ckpt runs/x/hiar_ema100.pt --num 64

For `num` teacher clips (CFG 3, 24 Euler steps, labels in turn, seed 0) the first N − 1 blocks
are written clean into the student's cache, as block-major sampling does, and the student
denoises block N − 1 in its K steps (noise from hiar.Noise, one seed per clip). Per row:

- jump: RGB distance of the new block's background (median colour, mean over its frames) from
  the last context block's; the teacher row is its own step between those two blocks;
- blobs: blobs per frame of the new block (the teacher row: its own last block).

A student that copies its context stays near the teacher's jump; a systematic per-block offset
shows as a larger one, and in a free rollout it compounds from block to block. The second table
is that free rollout (1×, the student's own order and trained context level, its own context;
quality.py's clips): blobs per frame in each block, the mean ground step between neighbouring
blocks and the change from the first block to the last. Their ratio tells a random wander
(about √(N − 1) = 1.7 for 4 blocks) from a steady slide (N − 1 = 3).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import hiar  # noqa: E402
import sample  # noqa: E402
from quality import TEACHER_STEPS, labels_for, student_video, teacher_video  # noqa: E402


@torch.no_grad()
def next_block(model: hiar.VideoDiT, context, label, noise: hiar.Noise):
    """The block after `context` (B, n·b, 3, H, W), clean, as block-major makes it: the context
    written at σ = 0, then cells (n, 0 … K − 1). → (B, b, 3, H, W)."""
    b = model.cfg.block
    n = context.shape[1] // b
    σ = hiar.student_sigmas(noise.K, model.cfg.shift)
    cache = model.new_cache()
    for i in range(n):
        hiar.write(model, cache, context[:, i * b:(i + 1) * b], 0.0, i, label)
    x = noise(0, n)
    for j in range(noise.K):
        x0_hat = x - σ[j] * model(x, σ[j], label, frame0=n * b, cache=cache)
        if j + 1 < noise.K:
            x = hiar.add_noise(x0_hat, noise(j + 1, n), σ[j + 1])
    return x0_hat


def per_block(video, block: int, shapes: int) -> dict:
    """A free rollout (B, T, 3, H, W) block by block: blobs per frame in each block, the mean
    ground step between neighbouring blocks and the first → last block change (RGB distance)."""
    b = sample.find_blobs(video, shapes)
    B, T = b["valid"].shape[:2]
    blobs = b["valid"].float().sum(-1).view(B, T // block, block).mean((0, 2))      # (N,)
    ground = b["background"].view(B, T // block, block, 3).mean(2)                 # (B, N, 3)
    return {"blobs": blobs.tolist(),
            "step": (ground[:, 1:] - ground[:, :-1]).norm(dim=-1).mean().item(),
            "change": (ground[:, -1] - ground[:, 0]).norm(dim=-1).mean().item()}


def jump_and_blobs(before, block, shapes: int) -> dict:
    """How far `block`'s background moved from `before`'s (mean RGB distance over clips) and
    `block`'s blobs per frame; both (B, b, 3, H, W) in [-1, 1]: `per_block` of the two."""
    r = per_block(torch.cat([before, block], 1), block.shape[1], shapes)
    return {"jump": r["step"], "blobs": r["blobs"][-1]}


@torch.no_grad()
def ar_rollout(ar_teacher: hiar.VideoDiT, eps, label, steps: int, shift: float, guidance: float):
    """An AR teacher's (Causal Forcing's) own video: block n's ODE after its own clean blocks
    (hiar.teacher_ode teacher-forced on what it made so far; each call re-solves the blocks
    before n to the same result, so this is slow but exact). eps (B, T, 3, H, W) → x0."""
    b, ctx = ar_teacher.cfg.block, torch.zeros_like(eps)
    for n in range(eps.shape[1] // b):
        x = hiar.teacher_ode(ar_teacher, eps, [], steps, shift, label, guidance, context=ctx)[1]
        ctx[:, n * b:(n + 1) * b] = x[:, n * b:(n + 1) * b]
    return ctx


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="*", default=None, metavar="PATH",
                   help="students to probe (default: ODE init and the shipped students)")
    p.add_argument("--ar-teacher", default=None, metavar="PATH",
                   help="also an AR teacher (init_teacher=causal): continuing the clips "
                        "teacher-forced, and its own block-by-block video")
    p.add_argument("--num", type=int, default=64, help="teacher clips (labels in turn)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for flag in ("num", "threads"):
        sample.check_int(f"--{flag}", getattr(args, flag))
    t_ck = sample.load_checkpoint(sample.SHIPPED / "teacher.pt")
    cfg = hiar.Config(**t_ck["config"])
    names = args.ckpt if args.ckpt is not None else ["ode_init"] + [
        q.stem for q in sorted(sample.SHIPPED.glob("*_s[0-9].pt"))]
    for name in names:                  # a student of the teacher's network (shipped or a path)
        path = sample.resolve_ckpt(name)
        sample.check_checkpoint(sample.load_checkpoint(path), path, "--ckpt", like=cfg)
    if args.ar_teacher:
        sample.check_checkpoint(sample.load_checkpoint(args.ar_teacher), args.ar_teacher,
                                "--ar-teacher", ("ar_teacher",), cfg)
    torch.set_num_threads(args.threads)
    teacher = sample.model_from_checkpoint(t_ck, "teacher", "ema").eval()
    label = labels_for(cfg, args.num)
    clips = teacher_video(teacher, cfg, args.num, 3.0, float(t_ck["train"]["ode_shift"]))
    b = cfg.block
    context, last = clips[:, :-b], clips[:, -b:]
    print(f"{args.num} teacher clips (CFG 3); the row continues their first "
          f"{cfg.frames // b - 1} blocks by one\n\n| row | jump | blobs / frame |\n|---|---|---|")
    r = jump_and_blobs(context[:, -b:], last, cfg.shapes)
    print(f"| teacher, its own last block | {r['jump']:.4f} | {r['blobs']:.3f} |")
    free = []
    if args.ar_teacher:                                     # its ODE after the clips' blocks
        ar = sample.model_from_checkpoint(sample.load_checkpoint(args.ar_teacher),
                                          args.ar_teacher, "ema").eval()
        g = torch.Generator().manual_seed(1)
        eps = torch.randn(clips.shape, generator=g)
        shift = float(t_ck["train"]["ode_shift"])
        cont = hiar.teacher_ode(ar, eps, [], TEACHER_STEPS, shift, label, 3.0,
                                context=clips)[1]
        r = jump_and_blobs(context[:, -b:], cont[:, -b:], cfg.shapes)
        print(f"| AR teacher, teacher-forced | {r['jump']:.4f} | {r['blobs']:.3f} |", flush=True)
        free.append(("AR teacher (CFG 3), its own past", per_block(
            ar_rollout(ar, eps, label, TEACHER_STEPS, shift, 3.0), b, cfg.shapes)))
    for name in names:
        shown = "/".join(Path(name).parts[-2:])             # a run's snapshot: run/file
        model, meta = sample.load_student(name, "cpu", like=cfg)
        noise = hiar.Noise(cfg, range(args.num))
        r = jump_and_blobs(context[:, -b:], next_block(model, context, label, noise), cfg.shapes)
        print(f"| {shown} | {r['jump']:.4f} | {r['blobs']:.3f} |", flush=True)
        for order in [meta["order"]] if "order" in meta else ["block", "step"]:  # ODE init: both
            level = sample.trained_level(meta, cfg)       # as sample.py and quality.py
            free.append((f"{shown}, {order}-major",
                         per_block(student_video(model, order, cfg, args.num, cfg.frames,
                                                 context_t=level), b, cfg.shapes)))
    print("\nFree rollouts (1×, own order and context)\n\n| row | blobs / frame by block | "
          "ground step | first → last | ratio |\n|---|---|---|---|---|")
    for name, r in [("teacher (CFG 3)", per_block(clips, b, cfg.shapes))] + free:
        print(f"| {name} | {' '.join(f'{v:.2f}' for v in r['blobs'])} | {r['step']:.4f} | "
              f"{r['change']:.4f} | {r['change'] / r['step']:.2f} |")


if __name__ == "__main__":
    sample.run_cli(main)
