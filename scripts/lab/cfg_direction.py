"""Which way does the real score's CFG push a clip's background, at each noise level?

    python scripts/lab/cfg_direction.py                 # ODE-init samples, CFG 3, 32 clips

At the first DMD step the critic is the teacher, so the step a student's x0 takes is
x0_real − x0_fake = x0_teacher(CFG w) − x0_teacher(CFG 1) = (w − 1)·(x0_label − x0_∅). This
prints that difference per label, averaged over the background pixels of ODE-init samples (a
pixel whose brightest channel is below 0.35), for a few σ: RGB in the data's [-1, 1] units.
docs/lab/distillation.md reads it against where the students' grounds go.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import hiar  # noqa: E402
import quality  # noqa: E402
import sample  # noqa: E402


def background_mean(d, x0, label, labels: int) -> list[list[float]]:
    """d (B, T, 3, H, W) averaged over the background pixels of x0, per label → [[r, g, b]]."""
    bg = (((x0 + 1) / 2).amax(2, keepdim=True) < 0.35).float()       # (B, T, 1, H, W)
    return [((d[label == lab] * bg[label == lab]).sum((0, 1, 3, 4))
             / bg[label == lab].sum((0, 1, 3, 4)).clamp(min=1)).tolist() for lab in range(labels)]


@torch.no_grad()
def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=32, help="clips (labels in turn)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sigmas", type=float, nargs="+",
                   default=[0.98, 0.95, 0.85, 0.8, 0.75, 0.6, 0.4, 0.1])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    sample.check_int("--num", args.num)
    sample.check_int("--threads", args.threads)
    sample.check_number("--guidance", args.guidance, 0, above=True)
    for sigma in args.sigmas:
        sample.check_number("--sigmas", sigma, 0, 1)
    torch.set_num_threads(args.threads)
    t_ck = sample.load_checkpoint(sample.SHIPPED / "teacher.pt")
    cfg = hiar.Config(**t_ck["config"])
    teacher = sample.model_from_checkpoint(t_ck, "teacher", "ema").eval()
    label = quality.labels_for(cfg, args.num)
    student, _ = sample.load_student("ode_init", "cpu")
    x0 = quality.student_video(student, "block", cfg, args.num, cfg.frames)
    g = torch.Generator().manual_seed(0)
    print(f"x0_teacher(CFG {args.guidance:g}) − x0_teacher(CFG 1) on the background, per label "
          f"(R, G, B); labels' blob hues are centred on turn label/{cfg.labels}")
    for s in args.sigmas:
        sig = torch.full((args.num,), s)
        x_t = hiar.add_noise(x0, torch.randn(x0.shape, generator=g), sig[:, None, None, None, None])
        d = (teacher.x0(x_t, sig, label, args.guidance, causal=False)
             - teacher.x0(x_t, sig, label, causal=False))
        cells = ["(" + ", ".join(f"{v:+.3f}" for v in rgb) + ")"
                 for rgb in background_mean(d, x0, label, cfg.labels)]
        print(f"σ {s:.2f}: " + "  ".join(f"label {i} {c}" for i, c in enumerate(cells)))


if __name__ == "__main__":
    sample.run_cli(main)
