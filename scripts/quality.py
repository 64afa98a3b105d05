"""Is a distilled student as good as its teacher? The measure of issue 17, for every row.

    python scripts/quality.py                          # data, teacher, ODE init, shipped students
    python scripts/quality.py --ckpt runs/x/self_forcing_ema100.pt:block   # any checkpoint
    python scripts/quality.py --num 64 --long 8 --out docs/quality.md

Each row samples `num` clips (labels 0, 1, 2, … in turn; sampling seed 0), each student in its
own order. Measured with `sample.find_blobs` (the background is a frame's median colour):

- at 1× (the training length): how far the background moves from the first block to the last
  (RGB distance, mean over clips), blobs per frame, peak value and radius of the blobs;
- at `long`× (8× by default, students only — the teacher is bidirectional and has one length):
  the per-label spread of the last block's background (RMS distance of a label's grounds from
  their mean; the smallest over labels — a label whose clips all end on one ground is collapsed)
  and the share of last grounds inside the data's background range (± TOL a channel).

`verdict` checks a student against the recipe's targets (issue 17, item 3), relative to the
teacher at the student's own real-score guidance and to the data. Writes the table to --out.
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

TOL = 0.03        # a ground counts as inside the data's range within ±TOL a channel
TEACHER_STEPS = 24
COLUMNS = ("bg_change", "blobs", "value", "radius", "spread_min", "in_range")


def measure(video, label, cfg: hiar.Config) -> dict:
    """Quality measures of videos (B, T, 3, H, W) in [-1, 1] with labels (B,): the 1× measures
    over the whole clip, the collapse measures on its last block. Known answers in the tests."""
    b = sample.find_blobs(video, cfg.shapes)
    bg = b["background"]                                             # (B, T, 3)
    first, last = bg[:, :cfg.block].mean(1), bg[:, -cfg.block:].mean(1)   # (B, 3)
    valid = b["valid"]
    spreads = []
    for lab in label.unique():
        g = last[label == lab]                                      # (n, 3) grounds of a label
        spreads.append(((g - g.mean(0)) ** 2).sum(-1).mean().sqrt())
    lo, hi = cfg.background
    inside = ((last >= lo - TOL) & (last <= hi + TOL)).all(-1)
    return dict(bg_change=(last - first).norm(dim=-1).mean().item(),
                blobs=valid.float().sum(-1).mean().item(),
                value=b["value"][valid].mean().item(), radius=b["radius"][valid].mean().item(),
                spread_min=min(spreads).item(), spread_mean=torch.stack(spreads).mean().item(),
                in_range=inside.float().mean().item(),
                last_ground=[[round(v, 3) for v in last[label == lab].mean(0).tolist()]
                             for lab in label.unique()])


def verdict(student_1x: dict, student_long: dict, teacher: dict, data_long: dict) -> list[str]:
    """The targets a student misses (issue 17, item 3); [] = as good as its teacher."""
    miss = []
    if not student_1x["bg_change"] <= min(0.03, 2 * teacher["bg_change"]):
        miss.append("bg_change")
    if not student_1x["blobs"] >= teacher["blobs"] - 0.1:
        miss.append("blobs")
    if not student_1x["radius"] <= teacher["radius"] + 0.15:
        miss.append("radius")
    if not student_long["spread_min"] >= 0.5 * data_long["spread_min"]:
        miss.append("spread")
    if not student_long["in_range"] >= 0.9:
        miss.append("in_range")
    return miss


def labels_for(cfg, num):
    return torch.arange(num) % cfg.labels if cfg.labels else torch.zeros(num, dtype=torch.long)


@torch.no_grad()
def student_video(model, order: str, cfg, num: int, frames: int, seed: int = 0):
    label = labels_for(cfg, num)
    noise = hiar.Noise(cfg, [seed * 1_000_003 + i for i in range(num)])
    lab = label if cfg.labels else None
    return torch.cat(list(sample.block_stream(model, order, noise, frames, lab, "next")), 1)


@torch.no_grad()
def teacher_video(teacher, cfg, num: int, guidance: float, ode_shift: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(num, cfg.frames, 3, cfg.size, cfg.size, generator=g)
    label = labels_for(cfg, num) if cfg.labels else None
    return hiar.teacher_ode(teacher, eps, [], TEACHER_STEPS, ode_shift, label, guidance)[1]


def data_video(cfg, num: int, frames: int, seed: int = 0):
    return torch.cat(list(sample.data_stream(cfg, num, seed, frames, labels_for(cfg, num))), 1)


def real_guidance(ck: dict) -> float:
    """The real score's guidance a student was distilled with (older checkpoints: `guidance`)."""
    train = ck.get("train", {})
    return float(train.get("dmd_guidance", train.get("guidance", 1.0)))


def shipped_rows() -> list[tuple[str, str]]:
    rows = [("ode_init", "block"), ("ode_init", "step")]
    for p in sorted(sample.SHIPPED.glob("*_s[0-9].pt")):
        ck = sample.load_checkpoint(p)
        rows.append((p.stem, ck.get("order", "step")))
    return rows


def fmt(d: dict | None) -> list[str]:
    if d is None:
        return ["–"] * len(COLUMNS)
    return [f"{d[k]:.3f}" if k in d else "–" for k in COLUMNS]


def check_args(args) -> list[tuple[str, str]]:
    """Every argument checked before any work (one-line errors); returns the rows to measure."""
    for flag in ("num", "long", "threads"):
        if getattr(args, flag) < 1:
            raise sample.CLIError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if any(not w > 0 for w in args.guidance):
        raise sample.CLIError(f"--guidance {args.guidance}: every scale must be > 0")
    if args.ckpt is None:
        rows = shipped_rows()
    else:
        if not args.ckpt:
            raise sample.CLIError("--ckpt: give at least one PATH:ORDER (none matched?)")
        rows = []
        for c in args.ckpt:
            name, _, order = c.rpartition(":")
            if not name or order not in ("block", "step"):
                raise sample.CLIError(f"--ckpt {c}: expected PATH:ORDER, ORDER block or step")
            sample.resolve_ckpt(name)                   # exists, or a shipped student's name
            rows.append((name, order))
    if args.out:
        sample._writable(args.out, "--out")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=64, help="clips per row (labels in turn)")
    p.add_argument("--long", type=int, default=8, help="the long length, × the training length")
    p.add_argument("--ckpt", nargs="*", default=None, metavar="PATH:ORDER",
                   help="rows to measure (default: ODE init and the shipped students)")
    p.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0],
                   help="teacher rows: CFG scales")
    p.add_argument("--out", default=None, help="write the table (markdown) and a .json here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = check_args(args)
    torch.set_num_threads(args.threads)
    t_ck = sample.load_checkpoint(sample.SHIPPED / "teacher.pt")
    cfg = hiar.Config(**t_ck["config"])
    ode_shift = float(t_ck.get("train", {}).get("ode_shift", 8.0))
    teacher = sample.model_from_checkpoint(t_ck, "teacher", "ema").eval()
    long = args.long * cfg.frames
    label = labels_for(cfg, args.num)
    out = {"num": args.num, "long": args.long, "rows": {}}
    data = {"1x": measure(data_video(cfg, args.num, cfg.frames), label, cfg),
            "long": measure(data_video(cfg, args.num, long), label, cfg)}
    out["rows"]["data"] = data
    teachers = {}
    want = sorted(set(args.guidance) | {real_guidance(sample.load_checkpoint(
        sample.resolve_ckpt(name))) for name, _ in rows if name != "ode_init"})
    for w in want:
        teachers[w] = measure(teacher_video(teacher, cfg, args.num, w, ode_shift), label, cfg)
        out["rows"][f"teacher, CFG {w:g}"] = {"1x": teachers[w], "long": None}
        print(f"teacher CFG {w:g}: {teachers[w]}", flush=True)
    for name, order in rows:
        model, meta = sample.load_student(name, "cpu")
        ck = sample.load_checkpoint(sample.resolve_ckpt(name))
        video = student_video(model, order, cfg, args.num, long)
        r = {"1x": measure(video[:, :cfg.frames], label, cfg), "long": measure(video, label, cfg),
             "order": order, "guidance": real_guidance(ck)}
        if name != "ode_init":
            r["miss"] = verdict(r["1x"], r["long"], teachers[r["guidance"]], data["long"])
        out["rows"][f"{name}, {order}-major"] = r
        print(f"{name} {order}: 1x {r['1x']} | {args.long}x {r['long']} | miss {r.get('miss')}",
              flush=True)
    table = [f"Quality measure (scripts/quality.py; {args.num} clips, labels in turn, sampling "
             f"seed 0; 1× = {cfg.frames} frames, long = {args.long}×)", "",
             "| row | 1×: bg change | blobs / frame | value | radius | "
             f"{args.long}×: label spread (min) | {args.long}×: in range | misses |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in out["rows"].items():
        one, lng = fmt(r["1x"])[:4], fmt(r["long"])[4:]
        miss = ", ".join(r["miss"]) or "none" if "miss" in r else ""
        table.append(f"| {name} | " + " | ".join(one + lng) + f" | {miss} |")
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sample.run_cli(main)
