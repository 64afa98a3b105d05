"""Is a distilled student as good as its teacher? One measure for every row, with its targets.

    python scripts/quality.py                          # data, teacher, ODE init, shipped students
    python scripts/quality.py --seeds 0 1 2 --out docs/quality.md     # the table in docs/
    python scripts/quality.py --ckpt runs/x/self_forcing_ema100.pt:block   # any checkpoint

Each row samples `num` clips per sampling seed (labels 0, 1, 2, … in turn), each student in its
own order; a row's numbers are the mean over the sampling seeds. Measured with
`sample.find_blobs` (the background, or ground, is a frame's median colour):

- at 1× (the training length): how far the ground moves from the first block to the last (RGB
  distance, mean over clips), blobs per frame, peak value and radius of the blobs, and motion:
  the blobs' tracked speed (pixels / frame) and the share of frozen clips (sample.FROZEN);
- at `long`× (8× by default, students only — the teacher is bidirectional and has one length):
  the per-label spread of the last block's ground (RMS distance of a label's grounds from their
  mean; the smallest over labels — a label whose clips all end on one ground is collapsed) and
  the share of last grounds inside the data's background range (± TOL a channel).

`verdict` lists the targets of a student near its teacher (TARGETS) that a student misses.
Students of several training seeds (`<name>_s<seed>`) get a summary row each: mean ± std over
their training seeds. Writes the tables to --out (markdown) and the numbers beside it (.json).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402

TOL = 0.03        # a ground counts as inside the data's range within ±TOL a channel
TEACHER_STEPS = 24
COLUMNS = ("bg_change", "blobs", "value", "radius", "speed", "frozen", "spread_min", "in_range")
# A student near its teacher: at 1× its ground moves at most 0.035 (teacher CFG 3: 0.015, data
# 0.004), it keeps >= 1.55 blobs a frame (teacher CFG 3: 1.65-1.70, data 1.71) and the teacher's
# radius (within 0.15 px); at 8× each label keeps grounds apart (spread >= 0.06; data 0.13) and
# >= 90 % of them inside the data's range.
TARGETS = dict(bg_change=0.035, blobs=1.55, radius=0.15, spread=0.06, in_range=0.9)


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
    speed = sample.drift_metrics(video, cfg.block, cfg.shapes,                   # (B,) per clip
                                 segments=video.shape[1] // cfg.block)["speed"][0]
    return dict(bg_change=(last - first).norm(dim=-1).mean().item(),
                blobs=valid.float().sum(-1).mean().item(),
                value=b["value"][valid].mean().item(), radius=b["radius"][valid].mean().item(),
                speed=speed.mean().item(),
                frozen=(speed < sample.FROZEN).float().mean().item(),
                spread_min=min(spreads).item(), spread_mean=torch.stack(spreads).mean().item(),
                in_range=inside.float().mean().item(),
                last_ground=[[round(v, 3) for v in last[label == lab].mean(0).tolist()]
                             for lab in label.unique()])


def verdict(student_1x: dict, student_long: dict, teacher: dict) -> list[str]:
    """The TARGETS a student misses (the radius relative to the teacher at the student's own
    real-score guidance); [] = near its teacher."""
    miss = []
    if not student_1x["bg_change"] <= TARGETS["bg_change"]:
        miss.append("bg_change")
    if not student_1x["blobs"] >= TARGETS["blobs"]:
        miss.append("blobs")
    if not student_1x["radius"] <= teacher["radius"] + TARGETS["radius"]:
        miss.append("radius")
    if not student_long["spread_min"] >= TARGETS["spread"]:
        miss.append("spread")
    if not student_long["in_range"] >= TARGETS["in_range"]:
        miss.append("in_range")
    return miss


def mean_of(rows: list[dict]) -> dict:
    """The numeric measures of several rollouts (one per sampling seed), averaged."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "last_ground"}


def labels_for(cfg, num):
    return torch.arange(num) % cfg.labels if cfg.labels else torch.zeros(num, dtype=torch.long)


@torch.no_grad()
def student_video(model, order: str, cfg, num: int, frames: int, seed: int = 0,
                  context_t: str = "next"):
    """`num` videos of `frames` frames in `order`; step-major at context level `context_t`."""
    label = labels_for(cfg, num)
    noise = hiar.Noise(cfg, [seed * 1_000_003 + i for i in range(num)])
    lab = label if cfg.labels else None
    return torch.cat(list(sample.block_stream(model, order, noise, frames, lab, context_t)), 1)


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


def fmt(d: dict | None, keys=COLUMNS) -> list[str]:
    if d is None:
        return ["–"] * len(keys)
    return [f"{d[k]:.3f}" if k in d else "–" for k in keys]


def check_args(args, cfg: hiar.Config) -> list[tuple[str, str]]:
    """Every argument checked before any work (one-line errors); returns the rows to measure,
    each a student of the teacher's network `cfg`."""
    for flag in ("num", "long", "threads"):
        sample.check_int(f"--{flag}", getattr(args, flag))
    for seed in args.seeds:
        sample.check_seed("--seeds", seed)
    for w in args.guidance:
        sample.check_number("--guidance", w, 0, above=True)
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
            path = sample.resolve_ckpt(name)           # exists, or a shipped student's name
            sample.check_checkpoint(sample.load_checkpoint(path), path, "--ckpt", like=cfg)
            rows.append((name, order))
    if args.out:                     # the table and its numbers: two files, neither an input
        sample.check_outputs({f"--out {args.out}": args.out,
                              f"--out's numbers {Path(args.out).with_suffix('.json')}":
                              Path(args.out).with_suffix(".json")},
                             {f"--ckpt {n}": sample.resolve_ckpt(n) for n, _ in rows})
    return rows


def by_training_seed(rows: dict) -> dict:
    """Students of several training seeds (`<name>_s<seed>, <order>-major` rows) grouped:
    {'<name>, <order>-major': {measure: (mean, std) over the training seeds, 'seeds': [...],
    'miss': targets missed by any seed}}."""
    groups = {}
    for key, r in rows.items():
        name, _, order = key.partition(", ")
        m = re.fullmatch(r"(.+)_s(\d+)", Path(name).stem)
        if m and "miss" in r:
            groups.setdefault(f"{m.group(1)}, {order}", []).append((int(m.group(2)), r))
    out = {}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        g = {"seeds": sorted(s for s, _ in members),
             "miss": sorted({k for _, r in members for k in r["miss"]})}
        for part in ("1x", "long"):
            vals = {k: torch.tensor([r[part][k] for _, r in members]) for k in COLUMNS}
            g[part] = {k: (v.mean().item(), v.std().item()) for k, v in vals.items()}
        out[key] = g
    return out


def tables(out: dict, cfg: hiar.Config) -> str:
    seeds, L = out["seeds"], out["long"]
    head = ("| row | 1×: bg change | blobs / frame | value | radius | speed | frozen | "
            f"{L}×: label spread (min) | {L}×: in range | misses |\n" + "|---" * 10 + "|")
    lines = [f"Quality measure (`python scripts/quality.py --seeds {' '.join(map(str, seeds))}`; "
             f"{out['num']} clips per sampling seed, labels in turn, sampling seeds {seeds}, "
             f"each row the mean over them; 1× = {cfg.frames} frames, long = {L}×; frozen: "
             f"share of clips whose blobs move < {sample.FROZEN} px/frame). misses: the targets "
             f"(TARGETS in the script: 1× ground change <= {TARGETS['bg_change']}, blobs >= "
             f"{TARGETS['blobs']}, radius <= the teacher's + "
             f"{TARGETS['radius']}, {L}× spread >= {TARGETS['spread']}, in range >= "
             f"{TARGETS['in_range']:.0%}) a student misses, against the teacher at its "
             "real-score guidance.", "", head]
    for name, r in out["rows"].items():
        one, lng = fmt(r["1x"])[:6], fmt(r["long"])[6:]
        miss = ", ".join(r["miss"]) or "none" if "miss" in r else ""
        lines.append(f"| {name} | " + " | ".join(one + lng) + f" | {miss} |")
    groups = out.get("by_training_seed", {})
    if groups:
        lines += ["", "By student: mean ± std over training seeds (each the mean of its sampling "
                  "seeds); misses: the targets any seed misses.", "", head]
        for name, g in groups.items():
            cells = [f"{g['1x'][k][0]:.3f} ± {g['1x'][k][1]:.3f}" for k in COLUMNS[:6]] + [
                f"{g['long'][k][0]:.3f} ± {g['long'][k][1]:.3f}" for k in COLUMNS[6:]]
            lines.append(f"| {name} (seeds {', '.join(map(str, g['seeds']))}) | "
                         + " | ".join(cells) + f" | {', '.join(g['miss']) or 'none'} |")
    return "\n".join(lines)


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=64, help="clips per row and sampling seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--long", type=int, default=8, help="the long length, × the training length")
    p.add_argument("--ckpt", nargs="*", default=None, metavar="PATH:ORDER",
                   help="rows to measure (default: ODE init and the shipped students)")
    p.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0],
                   help="teacher rows: CFG scales")
    p.add_argument("--out", default=None, help="write the table (markdown) and a .json here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    t_ck = sample.load_checkpoint(sample.SHIPPED / "teacher.pt")
    cfg = hiar.Config(**t_ck["config"])
    rows = check_args(args, cfg)
    torch.set_num_threads(args.threads)
    ode_shift = float(t_ck.get("train", {}).get("ode_shift", 8.0))
    teacher = sample.model_from_checkpoint(t_ck, "teacher", "ema").eval()
    long = args.long * cfg.frames
    label = labels_for(cfg, args.num)
    out = {"num": args.num, "long": args.long, "seeds": args.seeds, "rows": {}}

    def over_seeds(make):           # make(seed) → a video (B, T, …); its 1× and long measures
        one, lng = [], []
        for seed in args.seeds:
            video = make(seed)
            one.append(measure(video[:, :cfg.frames], label, cfg))
            lng.append(measure(video, label, cfg))      # --long 1: the 1× clip
        return mean_of(one), mean_of(lng)

    data = dict(zip(("1x", "long"), over_seeds(lambda s: data_video(cfg, args.num, long, s))))
    out["rows"]["data"] = data
    teachers = {}
    want = sorted(set(args.guidance) | {real_guidance(sample.load_checkpoint(
        sample.resolve_ckpt(name))) for name, _ in rows if name != "ode_init"})
    for w in want:
        teachers[w] = over_seeds(lambda s: teacher_video(teacher, cfg, args.num, w, ode_shift,
                                                         s))[0]
        out["rows"][f"teacher, CFG {w:g}"] = {"1x": teachers[w], "long": None}
        print(f"teacher CFG {w:g}: {teachers[w]}", flush=True)
    for name, order in rows:
        model, meta = sample.load_student(name, "cpu", like=cfg)
        ck = sample.load_checkpoint(sample.resolve_ckpt(name))
        level = sample.trained_level(meta, cfg)
        one, lng = over_seeds(lambda s: student_video(model, order, cfg, args.num, long, s,
                                                      level))
        r = {"1x": one, "long": lng, "order": order, "guidance": real_guidance(ck)}
        if name != "ode_init":
            r["miss"] = verdict(r["1x"], r["long"], teachers[r["guidance"]])
        suffix = "" if order == "block" or level == "next" else f", context {level}"
        out["rows"][f"{name}, {order}-major{suffix}"] = r
        print(f"{name} {order}: 1x {r['1x']} | {args.long}x {r['long']} | miss {r.get('miss')}",
              flush=True)
    out["by_training_seed"] = by_training_seed(out["rows"])
    text = tables(out, cfg)
    print(text)
    if args.out:
        sample.write_text(args.out, text + "\n")
        sample.write_text(Path(args.out).with_suffix(".json"), json.dumps(out, indent=1))


if __name__ == "__main__":
    sample.run_cli(main)
