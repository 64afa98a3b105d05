"""Regenerate the README's evidence: long rollouts of every shipped model, drift metrics over
5 segments, mean ± std over sampling seeds, a drift-curve figure and the side-by-side GIF.

    python scripts/evidence.py                      # ~10 min on the 2-core CPU
    python scripts/evidence.py --seeds 0 1 2 --num 8 --frames 96

Writes docs/evidence.md (the table), docs/evidence.json, docs/drift_curves.png (needs
matplotlib, the notebook extra) and docs/hiar_vs_self_forcing.gif.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402

# (row label, checkpoint, sampler, context level)
ROWS = [
    ("ODE-init student, block-major", "ode_init", "block", "next"),
    ("ODE-init student, step-major", "ode_init", "step", "next"),
    ("Self-Forcing-style (block-major DMD)", "self_forcing", "block", "next"),
    ("HiAR (step-major DMD + FKL)", "hiar", "step", "next"),
    ("HiAR without FKL", "hiar_no_fkl", "step", "next"),
    ("HiAR, context t_j (inference only)", "hiar", "step", "current"),
    ("HiAR, context clean (inference only)", "hiar", "step", "clean"),
    ("HiAR, context t_j (trained and sampled)", "hiar_ctx_current", "step", "current"),
    ("Self-Forcing-style, 4x DMD batch (GPU)", "self_forcing_batch32", "block", "next"),
    ("HiAR, 4x DMD batch (GPU)", "hiar_batch32", "step", "next"),
    ("Self-Forcing student sampled step-major", "self_forcing", "step", "next"),
    ("HiAR student sampled block-major", "hiar", "block", "next"),
]
SHOW = ["palette_err", "saturation", "brightness", "foreground", "sharpness", "colours", "speed",
        "flicker"]


def per_frame_curves(video, frames_per_point: int = 6):
    """Each measure averaged over videos and over windows of frames: {name: (points,)}."""
    out = {}
    for name, fn in sample.MEASURES.items():
        v = fn(video).mean(0)                                   # (T,)
        usable = len(v) - len(v) % frames_per_point
        out[name] = v[:usable].reshape(-1, frames_per_point).mean(-1).tolist()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num", type=int, default=8, help="videos per seed")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--rows", default=None, help="comma-separated row indices to run (default all)")
    p.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints"),
                   help="where the students are (e.g. another training seed's --ship folder)")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild docs/evidence.md from docs/evidence.json without sampling")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        ev = json.loads((out / "evidence.json").read_text())
        a = ev["args"]
        table = markdown_table(ev["results"], len(a["seeds"]), a["num"], a["frames"])
        (out / "evidence.md").write_text(table)
        print(table)
        plot_curves(ev["curves"], out / "drift_curves.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    models = {}
    results, curves, gif_rows = {}, {}, {}
    torch.set_num_threads(2)

    def record(label, videos_per_seed):
        per_seed = [sample.drift_metrics(v) for v in videos_per_seed]
        res = {}
        for name in SHOW:
            level = torch.stack([m[name][0].mean() for m in per_seed])
            slope = torch.stack([m[name][1].mean() for m in per_seed])
            res[name] = {"level": level.tolist(), "drift": slope.tolist()}
        results[label] = res
        curves[label] = per_frame_curves(torch.cat(videos_per_seed))

    data = []
    for seed in args.seeds:
        cfg = hiar.Config.preset("toy")
        g = torch.Generator().manual_seed(seed)
        data.append(hiar.moving_shapes(cfg, args.num, g, args.frames)[0])
    record("ground-truth data", data)
    gif_rows["data"] = sample.to_uint8(data[0][:4])
    for label, ckpt, sampler, ctx in rows:
        path = Path(args.ckpt_dir) / f"{ckpt}.pt"
        if not path.exists():
            print(f"skip {label}: {path} missing")
            continue
        if ckpt not in models:
            models[ckpt] = sample.load_student(str(path), "cpu")[0]
        model, videos = models[ckpt], []
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)
            hiar.moving_shapes(model.cfg, args.num, g, args.frames)    # same draws as sample.py
            noise = hiar.noise_bank(model.cfg, args.num, args.frames, g)
            with torch.no_grad():
                videos.append(sample.run_sampler(model, noise, sampler, ctx))
        record(label, videos)
        if (ckpt, sampler, ctx) in {("self_forcing", "block", "next"), ("hiar", "step", "next")}:
            gif_rows[label] = sample.to_uint8(videos[0][:4])
        print(f"done {label}", flush=True)
    (out / "evidence.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                   "curves": curves}, indent=1))
    table = markdown_table(results, len(args.seeds), args.num, args.frames)
    (out / "evidence.md").write_text(table)
    print(table)
    if len(gif_rows) > 1:
        sample.save_gif(out / "hiar_vs_self_forcing.gif", sample.grid_frames(gif_rows, per_row=4))
    plot_curves(curves, out / "drift_curves.png")


def summary(results: dict, label: str):
    """Two numbers per sampling seed, over all measures m (paper-style normalised drift):
    drift score = mean_m |drift_m| / data level_m,
    quality gap = mean_m |level_m − data_m| / data_m.
    Returns (drift (seeds,), gap (seeds,))."""
    data, res = results["ground-truth data"], results[label]
    ref = {m: torch.tensor(data[m]["level"]).mean().abs() for m in SHOW}
    drift = torch.stack([torch.tensor(res[m]["drift"]).abs() / ref[m] for m in SHOW]).mean(0)
    gap = torch.stack([(torch.tensor(res[m]["level"]) - ref[m]).abs() / ref[m]
                       for m in SHOW]).mean(0)
    return drift, gap


def markdown_table(results: dict, seeds: int, num: int, frames: int) -> str:
    head = "| rollout | drift score | quality gap | " + " | ".join(SHOW) + " |"
    lines = [head, "|---" * (len(SHOW) + 3) + "|"]
    for label, res in results.items():
        drift, gap = summary(results, label)
        cells = [f"**{drift.mean():.3f}**±{drift.std():.3f}", f"{gap.mean():.2f}±{gap.std():.2f}"]
        for name in SHOW:
            lv, dr = torch.tensor(res[name]["level"]), torch.tensor(res[name]["drift"])
            cells.append(f"{lv.mean():.3f} / {dr.mean():+.4f}±{dr.std():.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("\nDrift score: mean over the measures of |drift| / the data's level (lower: "
                 "flatter); quality gap: mean over the measures of |level − data| / data (lower: "
                 "closer to the data).")
    lines.append(f"Each measure's cell: level (mean over the video) / drift (slope per segment, "
                 f"5 segments) "
                 f"± std over {seeds} sampling seeds; {num} videos of {frames} frames per seed.")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -r requirements-notebooks.txt): no figure")
        return
    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, name in zip(axes.flat, SHOW):
        for i, (label, c) in enumerate(curves.items()):
            if label == "ground-truth data":
                ax.plot(c[name], "k--", label=label, lw=1.5)
            else:
                ax.plot(c[name], "-", color=plt.cm.tab20(i % 20), label=label, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("frame / 6")
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
