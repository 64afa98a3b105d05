"""How far each video's background colour moves from its first block's, over a long rollout.

The drift metrics measure the background's *level* (mean of RGB); a tint that changes hue at the
same level is invisible to them. This measures the RGB distance of each frame's background
(median pixel per channel) from the mean of the clip's first block, per time bin.

    python scripts/background_tint.py          # data and the distilled students, 40x, seed 0
    python scripts/background_tint.py 20       # in 20 time bins instead of 5
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402
from evidence import HIAR, SF, rollout_stream  # noqa: E402

ROWS = [("data", ["data"], None), ("Self-Forcing-style, block-major", SF, "block"),
        ("HiAR, step-major", HIAR, "step"), ("ODE init, block-major", ["ode_init"], "block")]


def tint_distance(stream, block: int, bins: int, frames: int) -> torch.Tensor:
    """Mean over videos of |background RGB − first block's| per time bin (bins,)."""
    per_frame = []
    for x in stream:
        rgb = (x.clamp(-1, 1) + 1) / 2                                  # (B, b, 3, H, W)
        per_frame.append(rgb.flatten(3).median(-1).values)              # (B, b, 3)
    bg = torch.cat(per_frame, 1)[:, :frames]                            # (B, T, 3)
    ref = bg[:, :block].mean(1, keepdim=True)
    dist = (bg - ref).norm(dim=-1)                                      # (B, T)
    return dist.view(dist.shape[0], bins, -1).mean(-1).mean(0)


def main():
    torch.set_num_threads(2)
    cfg = hiar.Config.preset("toy")
    frames, num, bins = 40 * cfg.frames, 8, int(sys.argv[1]) if len(sys.argv) > 1 else 5
    label = torch.arange(num) % cfg.labels
    print(f"background RGB distance from the clip's first block, mean of {num} videos "
          f"(sampling seed 0), {frames} frames in {bins} bins; ± std over training seeds")
    for name, ckpts, order in ROWS:
        models = {ck: sample.load_student(ck, "cpu")[0] for ck in ckpts if ck != "data"}
        with torch.no_grad():
            curves = [tint_distance(rollout_stream(models, ck, order, "next", 0.0, 0, num, frames,
                                                   cfg), cfg.block, bins, frames)
                      for ck in ckpts]
        c = torch.stack(curves)                            # (training seeds, bins)
        spread = (" ± " + " ".join(f"{v:.2f}" for v in c.std(0).tolist())) if len(c) > 1 else ""
        print(f"{name} ({len(c)} checkpoint{'s' * (len(c) > 1)}):\n  "
              + " ".join(f"{v:.2f}" for v in c.mean(0).tolist()) + spread)


if __name__ == "__main__":
    main()
