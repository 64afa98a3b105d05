"""Measure the teacher against the data, and size the σ schedules to the toy.

    python scripts/lab/toy_report.py --teacher checkpoints/teacher.pt     # ~5 min on the 2-core CPU

1. Teacher vs data: appearance persistence within a clip (share of clips whose blobs keep their
   hue, brightness and background over the 12 frames) and each attribute's distribution
   (percentiles), for teacher samples without and with CFG.
2. How much of a clip's appearance survives at level σ: noise data clips to σ, let the teacher
   predict x0, and compare the appearance it recovers (background colour, blob hue and
   brightness) with the truth, relative to what it gets from pure noise (σ = 1). This sizes the
   student's σ-shift: the step-major context of step j sits at σ_{j+1}.
3. The teacher's ODE grid shift (ODE pairs): sample quality per shift at 48 Euler steps.
Writes docs/lab/toy_report.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import hiar  # noqa: E402
import sample  # noqa: E402

ATTRS = ("value", "saturation", "radius")


def clip_appearance(video, shapes, block: int):
    """Does each clip keep its appearance from its first block to its last? Medians over each
    block's blobs (robust to frames where blobs overlap): background RGB within 0.03, and each
    blob of the last block within 0.03 turns in hue and 0.1 in brightness of the blob of the
    first block nearest to it in hue.
    Returns (persist (B,) bool, per-attribute pooled values for the distributions)."""
    b = sample.find_blobs(video, shapes)
    ok = b["valid"] & (b["saturation"] > 0.2)
    first, last = slice(0, block), slice(video.shape[1] - block, video.shape[1])
    bg_err = (b["background"][:, first].median(1).values
              - b["background"][:, last].median(1).values).abs().amax(-1)
    h0, ok0 = b["hue"][:, first].flatten(1), ok[:, first].flatten(1)        # (B, b·S)
    h1, ok1 = b["hue"][:, last].flatten(1), ok[:, last].flatten(1)
    d = (h1[..., None] - h0[:, None]).abs()
    d, match = torch.minimum(d, 1 - d).masked_fill(~ok0[:, None], 1.0).min(-1)   # (B, b·S)
    nan = torch.full_like(d, float("nan"))
    hue_err = torch.where(ok1, d, nan).nanmedian(1).values
    v0, v1 = b["value"][:, first].flatten(1), b["value"][:, last].flatten(1)
    val_err = torch.where(ok1, (v1 - v0.gather(1, match)).abs(), nan).nanmedian(1).values
    persist = (bg_err < 0.03) & (val_err.nan_to_num(1.0) < 0.1) & (hue_err.nan_to_num(1.0) < 0.03)
    pooled = {k: b[k][b["valid"]] for k in ATTRS}
    pooled["background"] = b["background"].mean(-1).flatten()
    pooled["blobs found"] = b["valid"].float().sum(-1).flatten()
    return persist, pooled


def pct(x, qs=(0.1, 0.5, 0.9)):
    x = x.float()
    return " / ".join(f"{torch.quantile(x, q).item():.2f}" for q in qs)


@torch.no_grad()
def teacher_vs_data(teacher, cfg, num, guidance, ode_shift, steps=24):
    g = torch.Generator().manual_seed(0)
    label = torch.arange(num) % cfg.labels if cfg.labels else None
    data, _ = hiar.moving_shapes(cfg, num, g, cfg.frames, label)
    eps = torch.randn(num, cfg.frames, 3, cfg.size, cfg.size, generator=g)
    rows = {"data": data}
    for w in (1.0, guidance):
        rows[f"teacher, CFG {w:g}"] = torch.cat([
            hiar.teacher_ode(teacher, eps[i:i + 64], [], steps, ode_shift,
                             None if label is None else label[i:i + 64], w)[1]
            for i in range(0, num, 64)])
    lines = [f"| samples ({num} clips, {steps} Euler steps, ODE shift {ode_shift:g}) | "
             "appearance persists over the clip | " + " | ".join(
                 f"{k} (p10 / p50 / p90)" for k in (*ATTRS, "background", "blobs found"))
             + " |", "|---" * 7 + "|"]
    for name, v in rows.items():
        persist, pooled = clip_appearance(v, cfg.shapes, cfg.block)
        lines.append(f"| {name} | {persist.float().mean():.0%} | " + " | ".join(
            pct(pooled[k]) for k in (*ATTRS, "background", "blobs found")) + " |")
    return "\n".join(lines), rows


@torch.no_grad()
def recoverable(teacher, cfg, num, sigmas):
    """Appearance error of the teacher's x0 prediction from a clip at level σ, relative to σ = 1."""
    g = torch.Generator().manual_seed(1)
    label = torch.arange(num) % cfg.labels if cfg.labels else None
    x0, _ = hiar.moving_shapes(cfg, num, g, cfg.frames, label)
    truth = sample.find_blobs(x0, cfg.shapes)
    eps = torch.randn(x0.shape, generator=g)

    def error(pred):
        b = sample.find_blobs(pred, cfg.shapes)
        bg = (b["background"] - truth["background"]).abs().mean()
        ok = b["valid"] & truth["valid"]
        d = (b["hue"][..., None] - truth["hue"][..., None, :]).abs()
        hue = torch.minimum(d, 1 - d).amin(-1)[ok].mean()
        val = (sample._mean_valid(b["value"], b["valid"])
               - sample._mean_valid(truth["value"], truth["valid"])).abs().nanmean()
        return torch.stack([bg, hue, val])

    errs = {}
    for s in sigmas:
        x_t = hiar.add_noise(x0, eps, s)
        pred = torch.cat([teacher.x0(x_t[i:i + 64], s, None if label is None else
                                     label[i:i + 64], causal=False) for i in range(0, num, 64)])
        errs[s] = error(pred)
    prior = errs[1.0]
    return {s: (1 - (e / prior).clamp(max=1)).mean().item() for s, e in errs.items()}


def shown(path) -> str:
    """A path as the report prints it: relative to the repository when inside it (a report must
    not carry the machine it was made on)."""
    shown_path = Path(sample.repo_path(path))
    return shown_path.name if shown_path.is_absolute() else str(shown_path)


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "checkpoints" / "teacher.pt"))
    p.add_argument("--num", type=int, default=256, help="clips per measurement")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "lab" / "toy_report.md"))
    args = p.parse_args(argv)
    sample.check_int("--num", args.num, 2)
    sample.check_number("--guidance", args.guidance, 0, above=True)
    ck = sample.load_checkpoint(args.teacher)
    sample.check_checkpoint(ck, args.teacher, "--teacher", ("teacher",))
    sample.check_outputs({f"--out {args.out}": args.out},
                         {f"--teacher {args.teacher}": args.teacher})
    torch.set_num_threads(2)
    teacher = sample.model_from_checkpoint(ck, args.teacher, "ema").eval()
    cfg = teacher.cfg
    out = [f"# Toy report: the teacher against the data, and the schedule\n",
           f"Teacher: `{shown(args.teacher)}` ({ck.get('note', 'no note')}).\n",
           "## 1. Teacher samples against the data\n",
           "A clip's appearance *persists* if, from its first block to its last (medians over "
           "each block's frames), the background moves less than 0.03 and each blob "
           "keeps its hue within 0.03 turns and its brightness within 0.1 (blobs found by "
           "`sample.find_blobs`, the metrics' estimator, so the data's own figure shows the "
           "estimator's noise).\n"]
    table, _ = teacher_vs_data(teacher, cfg, args.num, args.guidance, 8.0)
    out.append(table + "\n")
    print(table, flush=True)
    grid = [1.0, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    rec = recoverable(teacher, cfg, args.num, grid)
    out.append("\n## 2. Appearance recoverable from a clip at level σ\n")
    out.append("Share of the appearance error removed relative to pure noise (1 = all of the "
               "clip's background colour, blob hue and brightness recovered), teacher's x0 "
               "prediction from the whole clip at σ:\n")
    out.append("| σ | " + " | ".join(f"{s:g}" for s in grid) + " |")
    out.append("|---" * (len(grid) + 1) + "|")
    out.append("| recoverable | " + " | ".join(f"{rec[s]:.2f}" for s in grid) + " |\n")
    out.append("The step-major context of step j sits at σ_{j+1}. Student levels per shift "
               f"(K = {cfg.K}), with the recoverable share at each context level "
               "(interpolated):\n")
    out.append("| shift | σ_1, σ_2, σ_3 (context levels of steps 0-2) | recoverable at each |")
    out.append("|---|---|---|")
    xs = torch.tensor(grid[::-1])
    ys = torch.tensor([rec[s] for s in grid[::-1]])
    for shift in (5.0, 3.0, 2.0, 1.0, 0.5):
        sig = hiar.student_sigmas(cfg.K, shift)[1:-1]
        r = [float(np.interp(s, xs.numpy(), ys.numpy())) for s in sig]
        out.append(f"| {shift:g} | {', '.join(f'{s:.3f}' for s in sig)} | "
                   f"{', '.join(f'{v:.2f}' for v in r)} |")
    print("\n".join(out[-12:]), flush=True)
    out.append("\n## 3. The teacher's ODE grid shift\n")
    for shift in (1.0, 3.0, 8.0):
        table, _ = teacher_vs_data(teacher, cfg, args.num // 2, args.guidance, shift, steps=48)
        out.append(table + "\n")
        print(table, flush=True)
    sample.write_text(args.out, "\n".join(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sample.run_cli(main)
