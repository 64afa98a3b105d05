"""Regenerate the README's evidence from the shipped checkpoints: long rollouts of each row,
the drift metrics (sample.DriftMeter) at 8× and 40× the training length, mean ± std over
sampling seeds (and over training seeds where a row has several checkpoints), drift curves and a
side-by-side GIF.

    python scripts/evidence.py                     # every row, into runs/evidence/: ~40 min
    python scripts/evidence.py --out docs          # the same, refreshing the committed docs/
    python scripts/evidence.py --out docs --rows 1,2 --no-gif   # redo two rows, keep the rest
    python scripts/evidence.py --out docs --table-only          # the tables from the json only

Takes about 40 minutes on a 2-core CPU (3 sampling seeds × 8 videos × 480 frames for each of
~20 rows; the committed docs/ were made in two halves by --rows side by side, 27 + 15 min).
Writes into --out (default runs/evidence/, so the committed docs/ stay as they are unless asked):
evidence.json, evidence.md (full table), evidence_summary.md (≤ 6 columns), claims.md (the
paper's claims, with quality.json from scripts/quality.py: --out's, else docs/'s),
long_videos.md (each student with and without an attention sink), drift_curves.png (needs
matplotlib, the notebook extra) and drift_40x.gif.
Videos stream through the meters block by block, so memory does not grow with the length.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import namedtuple
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402

SF = [f"self_forcing_s{i}" for i in range(3)]     # one checkpoint per training seed
HIAR_NO_FKL = [f"hiar_no_fkl_s{i}" for i in range(3)]
HIAR = [f"hiar_s{i}" for i in range(3)]
FIRST = [0]          # rows sampled with seed 0 only: the spread is then over training seeds
# A row: its label, checkpoints (one per training seed), sampler, context level, x0 bias,
# sampling seeds (None: --seeds) and whether block 0 stays in the window (an attention sink).
# The three students differ in one thing at a time: Self-Forcing-style → HiAR without FKL is
# the order alone, → HiAR adds the forward-KL term alone.
Row = namedtuple("Row", "label ckpts sampler ctx bias seeds sink", defaults=(0.0, None, False))
ROWS = [
    Row("Self-Forcing-style, block-major", SF, "block", "clean"),
    Row("HiAR without FKL, step-major", HIAR_NO_FKL, "step", "next"),
    Row("HiAR, step-major", HIAR, "step", "next"),
    Row("HiAR, context t_j (inference only)", HIAR, "step", "current"),
    Row("HiAR, context clean (inference only)", HIAR, "step", "clean"),
    Row("Self-Forcing weights, step-major", SF, "step", "next", seeds=FIRST),
    Row("HiAR without FKL weights, block-major", HIAR_NO_FKL, "block", "clean", seeds=FIRST),
    Row("Self-Forcing-style + bias, block-major", SF, "block", "clean", 0.03, FIRST),
    Row("HiAR + bias, step-major", HIAR, "step", "next", 0.03, FIRST),
    Row("Self-Forcing-style + sink, block-major", SF, "block", "clean", seeds=FIRST, sink=True),
    Row("HiAR without FKL + sink, step-major", HIAR_NO_FKL, "step", "next", seeds=FIRST,
        sink=True),
    Row("HiAR + sink, step-major", HIAR, "step", "next", seeds=FIRST, sink=True),
    Row("ODE init, block-major", ["ode_init"], "block", "clean"),
    Row("ODE init, step-major", ["ode_init"], "step", "next"),
    Row("ODE init + bias, block-major", ["ode_init"], "block", "clean", 0.03),
    Row("ODE init + bias, step-major", ["ode_init"], "step", "next", 0.03),
]
DATA = Row("data", ["data"], None, None)
GIF_ROWS = ("Self-Forcing-style, block-major", "HiAR without FKL, step-major", "HiAR, step-major")
CURVE_ROWS = ("Self-Forcing-style, block-major", "HiAR without FKL, step-major",
              "HiAR, step-major", "ODE init, block-major")
CURVE_POINTS = 20


def rollout_stream(models, ck, row: Row, seed, num, frames, cfg):
    """One rollout of checkpoint `ck` as the row samples it (or the data, ck = "data") of `num`
    videos, block by block."""
    label = torch.arange(num) % cfg.labels if cfg.labels else None
    if ck == "data":
        return sample.data_stream(cfg, num, seed, frames, label)
    noise = hiar.Noise(cfg, [seed * 1_000_003 + i for i in range(num)])
    return sample.block_stream(models[ck], row.sampler, noise, frames, label, row.ctx,
                               x0_bias=row.bias, sink=row.sink)


def run_row(models, ckpts, row: Row, seeds, num, frames, lengths, cfg):
    """Stream every (checkpoint, seed) rollout through meters: {length: [result per ckpt×seed]}
    and curves (CURVE_POINTS bins over the longest length)."""
    out = {L: [] for L in lengths}
    curves, window = [], cfg.frames // cfg.block                # blocks in the last window
    for ck in ckpts:
        for seed in seeds:
            meters = {L: sample.DriftMeter(L, cfg.block, cfg.shapes) for L in lengths}
            curve = sample.DriftMeter(frames, cfg.block, cfg.shapes, segments=CURVE_POINTS)
            t, first, counts, at = 0, None, [], {}
            with torch.no_grad():
                for x in rollout_stream(models, ck, row, seed, num, frames, cfg):
                    for L, m in meters.items():
                        if t < L:
                            m.update(x[:, :L - t])
                    curve.update(x)
                    blobs = sample.find_blobs(x, cfg.shapes)
                    g = blobs["background"].mean(1)             # (B, 3): this block's ground
                    first = g if first is None else first
                    counts = (counts + [blobs["valid"].float().sum(-1)])[-window:]   # (B, b) each
                    t += x.shape[1]
                    if t in meters:                             # the last block of length t
                        at[t] = {"ground_change": (g - first).norm(dim=-1),   # (B,) from block 0
                                 "blobs": torch.cat(counts, 1).mean(1)}      # (B,) last window
            for L, m in meters.items():
                out[L].append({**m.result(), **at[L]})
            curves.append(curve.sums)
    return out, curves


def side_by_side_gif(models, cfg, frames: int, path: Path):
    """The first three videos of sampling seed 0 (the same as in the tables: the noise is per
    video) of the data and each GIF row, every 4th frame."""
    rows = [DATA] + [r for r in ROWS if r.label in GIF_ROWS and r.ckpts[0] in models]
    gifs = {}
    with torch.no_grad():
        for row in rows:
            v = torch.cat(list(rollout_stream(models, row.ckpts[0], row, 0, 3, frames, cfg)), 1)
            gifs[row.label] = sample.to_uint8(v)[:, ::4]
    sample.save_gif(path, sample.grid_frames(gifs, scale=3, per_row=3), fps=8)
    print(f"wrote {path}")


def combine(results: list[dict]) -> dict:
    """Per measure: level and drift as mean over videos per rollout (one per ckpt × seed); the
    ground's change from the first block to the last (RGB distance), blobs per frame in the last
    window and the share of frozen videos (speed level < sample.FROZEN), per rollout."""
    out = {name: {"level": [r[name][0].nanmean().item() for r in results],
                  "drift": [r[name][1].nanmean().item() for r in results]}
           for name in sample.MEASURES}
    for name in ("ground_change", "blobs"):
        out[name] = [r[name].mean().item() for r in results]
    out["frozen"] = [(r["speed"][0] < sample.FROZEN).float().mean().item() for r in results]
    return out


def spread_of(data: list[dict]) -> dict:
    """The data's spread between videos per measure, over all data videos (every seed)."""
    return sample.data_spread({n: (torch.cat([d[n][0] for d in data]), None)
                               for n in sample.MEASURES})


def scores(results: list[dict], spread: dict) -> list[float]:
    """Drift score per rollout, in units of the data's spread between videos."""
    return [sample.drift_score(r, spread=spread).mean().item() for r in results]


def curve_means(sums_list) -> dict:
    """Curves per measure averaged over videos and rollouts: {name: [CURVE_POINTS values]}."""
    out = {}
    for name in sample.MEASURES:
        if name == "jump":
            continue
        per = [(s[name][0] / s[name][1].clamp(min=1)).mean(0) for s in sums_list]
        out[name] = torch.stack(per).mean(0).tolist()
        out[name + "_std"] = torch.stack([(s[name][0] / s[name][1].clamp(min=1)).std(0)
                                          for s in sums_list]).mean(0).tolist()
    return out


def load_evidence(path: Path) -> dict:
    """docs/evidence.json with its lengths as ints again (JSON keys are strings)."""
    ev = json.loads(path.read_text())
    ev["rows"] = {k: {int(L): r for L, r in v.items()} for k, v in ev["rows"].items()}
    return ev


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--num", type=int, default=8, help="videos per seed")
    p.add_argument("--short", type=int, default=8, help="short length, × the training length")
    p.add_argument("--long", type=int, default=40, help="long length, × the training length")
    p.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints"))
    p.add_argument("--out", default=str(ROOT / "runs" / "evidence"),
                   help="where to write; 'docs' refreshes the committed tables and figures")
    p.add_argument("--rows", default=None,
                   help="indices into ROWS, comma-separated: recompute these rows and keep the "
                        "others of --out's evidence.json (default: all rows, from scratch; "
                        "'': the "
                        "GIF only)")
    p.add_argument("--no-gif", dest="gif", action="store_false", help="leave the GIF as it is")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the tables from --out's evidence.json without sampling")
    args = p.parse_args(argv)
    for seed in args.seeds:
        sample.check_seed("--seeds", seed)
    for flag in ("num", "short", "long", "threads"):
        sample.check_int(f"--{flag}", getattr(args, flag))
    picked = [i for i in (args.rows or "").split(",") if i]
    for i in picked:
        sample.check(i.isdigit() and int(i) < len(ROWS), "--rows", args.rows,
                     f"indices into ROWS, 0..{len(ROWS) - 1}, comma-separated")
    out, ckdir = sample.check_dir("--out", args.out), Path(args.ckpt_dir)
    if args.table_only:
        if not (out / "evidence.json").is_file():
            raise sample.CLIError(f"--table-only: no {out / 'evidence.json'} to rebuild from")
        return write_tables(load_evidence(out / "evidence.json"), out)
    torch.set_num_threads(args.threads)
    print(f"evidence: about 40 min on a 2-core CPU for every row; writing into {out}", flush=True)
    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",") if i]
    models, cfg = {}, None
    gif_rows = [r for r in ROWS if r.label in GIF_ROWS] if args.gif else []
    for row in rows + gif_rows:
        for ck in row.ckpts:
            if ck not in models and (ckdir / f"{ck}.pt").exists():
                models[ck] = sample.load_student(str(ckdir / f"{ck}.pt"), "cpu")[0]
                cfg = models[ck].cfg
    if cfg is None:
        raise sample.CLIError(f"--ckpt-dir {ckdir}: no checkpoints of these rows there")
    lengths = [args.short * cfg.frames, args.long * cfg.frames]
    sample.check(lengths[0] >= 5 * cfg.block, "--short", args.short,   # the meters' 5 segments
                 f"too short for 5 segments of a block: >= {-(-5 * cfg.block // cfg.frames)}")
    sample.check(lengths[1] >= max(lengths[0], CURVE_POINTS * cfg.block), "--long", args.long,
                 f"must be >= --short and >= {-(-CURVE_POINTS * cfg.block // cfg.frames)} "
                 f"(the curves' {CURVE_POINTS} points)")
    frames = lengths[-1]
    if not rows:                                    # --rows "": the GIF alone
        return side_by_side_gif(models, cfg, frames, out / "drift_40x.gif")
    recorded = {**vars(args), "ckpt_dir": sample.repo_path(ckdir), "out": sample.repo_path(out)}
    same = {k: v for k, v in recorded.items()
            if k not in ("rows", "table_only", "threads", "gif")}
    old = load_evidence(out / "evidence.json") if (out / "evidence.json").exists() else None
    if args.rows is not None and old and {k: old["args"].get(k) for k in same} == same:
        ev = old                                    # --rows: recompute these rows, keep the rest
        ev["args"] = recorded
    else:
        data_res, data_curves = run_row({}, DATA.ckpts, DATA, args.seeds, args.num, frames,
                                        lengths, cfg)
        ev = {"args": recorded, "lengths": lengths, "rows": {}, "curves": {}}
        ev["data_spread"] = {str(L): spread_of(data_res[L]) for L in lengths}
        ev["rows"]["data"] = {L: {"measures": combine(data_res[L]), "ckpts": [],
                                  "score": scores(data_res[L], ev["data_spread"][str(L)]),
                                  "seeds": args.seeds} for L in lengths}
        ev["curves"]["data"] = curve_means(data_curves)
    for row in rows:
        have = [c for c in row.ckpts if c in models]
        if not have:
            print(f"skip {row.label}: none of {row.ckpts} shipped")
            continue
        seeds = row.seeds or args.seeds
        res, curves = run_row(models, have, row, seeds, args.num, frames, lengths, cfg)
        ev["rows"][row.label] = {L: {"measures": combine(res[L]),
                                     "score": scores(res[L], ev["data_spread"][str(L)]),
                                     "ckpts": have, "seeds": seeds, "sampler": row.sampler,
                                     "context_t": row.ctx, "bias": row.bias, "sink": row.sink}
                                 for L in lengths}
        ev["curves"][row.label] = curve_means(curves)
        print(f"done {row.label}", flush=True)
    order = ["data"] + [r.label for r in ROWS]
    ev["rows"] = {k: ev["rows"][k] for k in order if k in ev["rows"]}
    sample.write_text(out / "evidence.json", json.dumps(ev, indent=1))
    write_tables(ev, out)
    if args.gif:
        side_by_side_gif(models, cfg, frames, out / "drift_40x.gif")
    plot_curves(ev, out / "drift_curves.png", lengths[-1], cfg.frames)


def by_training_seed(values: list, ckpts: list) -> tuple[torch.Tensor, str]:
    """Rollout values (checkpoint-major) → one value per training seed (mean over its sampling
    seeds) where a row has several checkpoints, else the values per sampling seed."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(ckpts) > 1:
        return t.view(len(ckpts), -1).mean(1), "training seeds"
    return t, "sampling seeds"


def fmt_row(values, ckpts, digits=3, sign=False) -> str:
    t, _ = by_training_seed(values, ckpts)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(t.mean()) + ("" if len(t) < 2 else f" ± {t.std():.{digits}f}")


def write_tables(ev: dict, out: Path):
    """docs/evidence.md, docs/evidence_summary.md and docs/claims.md from the evidence (and
    docs/quality.json, scripts/quality.py's numbers at 1× and 8×, where it exists)."""
    args = argparse.Namespace(**ev["args"])
    full, summary = tables(ev, args)
    sample.write_text(out / "evidence.md", full)
    sample.write_text(out / "evidence_summary.md", summary)
    q = out / "quality.json" if (out / "quality.json").exists() else ROOT / "docs" / "quality.json"
    quality = json.loads(q.read_text()) if q.exists() else {}
    sample.write_text(out / "claims.md", claims(ev, quality))
    sample.write_text(out / "long_videos.md", long_videos(ev))
    print(summary)


def _get(by_len: dict, L: int) -> dict:
    return by_len[L] if L in by_len else by_len[str(L)]


def tables(ev: dict, args) -> tuple[str, str]:
    """The full table (every measure, both lengths) and the README summary (≤ 6 columns)."""
    L0, L1 = ev["lengths"]
    extra = ("ground_change", "blobs", "frozen")
    head = ("| rollout | length | seeds (training × sampling) | drift score | "
            + " | ".join(sample.MEASURES + extra) + " |\n"
            + "|---" * (len(sample.MEASURES) + len(extra) + 4) + "|")
    lines = [head]
    for label, by_len in ev["rows"].items():
        for L in (L0, L1):
            r = _get(by_len, L)
            ck = r["ckpts"] or ["data"]
            seeds = f"{len(ck)} × {len(r['seeds'])}" if r["ckpts"] else f"– × {len(r['seeds'])}"
            cells = [fmt_row(r["score"], ck, 2)]
            for name in sample.MEASURES:
                m = r["measures"][name]
                cells.append(f"{fmt_row(m['level'], ck)} / {fmt_row(m['drift'], ck, 4, True)}")
            cells += [fmt_row(r["measures"][k], ck) if k in r["measures"] else "–"
                      for k in extra]
            lines.append(f"| {label} | {L} | {seeds} | " + " | ".join(cells) + " |")
    note = ("\nEach measure: level (mean over the video) / drift (slope per segment, 5 "
            "segments). Mean ± std over **training seeds** (each the mean of its sampling seeds) "
            f"where a row has several checkpoints, else over sampling seeds; {args.num} videos "
            "per rollout. "
            f"Drift score: each video's mean |drift| over the attribute levels "
            f"({', '.join(sample.SCORED)}) in units of the data's spread between "
            f"videos (0 = flat; the data row's score is the metric's noise floor). Measures: "
            + "; ".join(f"{k}: {v}" for k, v in sample.DESCRIPTIONS.items())
            + "; ground_change: RGB distance of the last block's ground (median colour) from the "
            "first block's; blobs: blobs per frame in the last window; frozen: share of videos "
            f"whose blobs move < {sample.FROZEN} px/frame.\n")
    summary = [f"| rollout, {L1} frames | drift score | ground change | speed | frozen | "
               "hue error |", "|---|---|---|---|---|---|"]
    for label, by_len in ev["rows"].items():
        r = _get(by_len, L1)
        m, ck = r["measures"], r["ckpts"] or ["data"]
        cells = [fmt_row(r["score"], ck, 2),
                 fmt_row(m["ground_change"], ck) if "ground_change" in m else "–",
                 fmt_row(m["speed"]["level"], ck, 2),
                 f"{torch.tensor(m['frozen']).mean():.2f}" if "frozen" in m else "–",
                 f"{torch.tensor(m['hue_err']['level']).mean():.3f}"]
        summary.append(f"| {label} | " + " | ".join(cells) + " |")
    summary.append(f"\nMean ± std over training seeds (the row's checkpoints, each the mean of "
                   "its sampling seeds) for rows with several; over sampling seeds otherwise; "
                   f"{args.num} videos a rollout; frozen and hue error: means. Full table: "
                   "docs/evidence.md.")
    return "\n".join(lines) + note, "\n".join(summary) + "\n"


def claims(ev: dict, quality: dict) -> str:
    """The paper's claims on the matched students (docs/claims.md): each number mean ± std over
    training seeds (3 sampling seeds each) — quality at 1× and 8× from scripts/quality.py,
    drift and the ground at 8× and 40×, motion — one table per claim."""
    L0, L1 = ev["lengths"]
    rows, groups = ev["rows"], quality.get("by_training_seed", {})
    n0, n1 = L0 // (L1 // ev["args"]["long"]), ev["args"]["long"]     # lengths in × training

    def evi(label, L, key, digits=3):
        if label not in rows:
            return "–"
        r = _get(rows[label], L)
        ck, m = r["ckpts"] or ["data"], r["measures"]
        if key == "score":
            return fmt_row(r["score"], ck, 2)
        v = m.get(key)
        return "–" if v is None else fmt_row(v["level"] if isinstance(v, dict) else v, ck, digits)

    def qual(student, part, key):
        g = groups.get(student)
        return "–" if g is None else f"{g[part][key][0]:.3f} ± {g[part][key][1]:.3f}"

    students = [("Self-Forcing-style (block-major, λ = 0)", "self_forcing, block-major",
                 "Self-Forcing-style, block-major"),
                ("HiAR without FKL (step-major, λ = 0)", "hiar_no_fkl, step-major",
                 "HiAR without FKL, step-major"),
                ("HiAR (step-major, λ = 0.1)", "hiar, step-major", "HiAR, step-major")]
    qs = quality.get("seeds", [])
    out = ["# The paper's claims on the matched students", "",
           f"Made by `python scripts/quality.py --seeds {' '.join(map(str, qs))} --out "
           "docs/quality.md` and `python scripts/evidence.py --out docs` (this file: "
           "`--table-only`). "
           "Three students from one ODE init and one DMD recipe, three training seeds each; "
           "they differ in one thing at a time. Every cell: mean ± std over the training seeds, "
           "each the mean of its sampling seeds "
           f"({len(qs)} × {quality.get('num', '–')} clips at 1× and "
           f"{quality.get('long', '–')}×; "
           f"{len(ev['args']['seeds'])} × {ev['args']['num']} videos at {n0}× and {n1}×).", "",
           "## 1. The order alone", "",
           f"| student | 1×: ground change | 1×: blobs / frame | {n0}×: label spread | {n0}×: "
           f"in range | drift score {n0}× | drift score {n1}× | ground change {n0}× | "
           f"ground change {n1}× |", "|---" * 9 + "|"]
    data_q = {part: quality.get("rows", {}).get("data", {}).get(part) or {}
              for part in ("1x", "long")}
    dq = lambda part, k: f"{data_q[part][k]:.3f}" if k in data_q[part] else "–"   # noqa: E731
    out.append(f"| data | {dq('1x', 'bg_change')} | {dq('1x', 'blobs')} | "
               f"{dq('long', 'spread_min')} | {dq('long', 'in_range')} | "
               f"{evi('data', L0, 'score')} | {evi('data', L1, 'score')} | "
               f"{evi('data', L0, 'ground_change')} | {evi('data', L1, 'ground_change')} |")
    for name, q, e in students:
        out.append(f"| {name} | {qual(q, '1x', 'bg_change')} | {qual(q, '1x', 'blobs')} | "
                   f"{qual(q, 'long', 'spread_min')} | {qual(q, 'long', 'in_range')} | "
                   f"{evi(e, L0, 'score')} | {evi(e, L1, 'score')} | "
                   f"{evi(e, L0, 'ground_change')} | {evi(e, L1, 'ground_change')} |")
    out += ["", "The same weights sampled in both orders (the students' own order as above; the "
            "swapped order and the bias rows on sampling seed 0 only; the ODE init on 3 "
            "sampling seeds):", "",
            f"| weights | block-major: drift score {n1}× | step-major: drift score {n1}× | "
            f"block-major: ground change {n1}× | step-major: ground change {n1}× |",
            "|---|---|---|---|---|"]
    for w, blk, stp in (("ODE init", "ODE init, block-major", "ODE init, step-major"),
                        ("Self-Forcing-style", "Self-Forcing-style, block-major",
                         "Self-Forcing weights, step-major"),
                        ("HiAR without FKL", "HiAR without FKL weights, block-major",
                         "HiAR without FKL, step-major"),
                        ("ODE init + bias 0.03", "ODE init + bias, block-major",
                         "ODE init + bias, step-major"),
                        ("distilled + bias 0.03", "Self-Forcing-style + bias, block-major",
                         "HiAR + bias, step-major")):
        out.append(f"| {w} | {evi(blk, L1, 'score')} | {evi(stp, L1, 'score')} | "
                   f"{evi(blk, L1, 'ground_change')} | {evi(stp, L1, 'ground_change')} |")
    out += ["", "## 2. The context level (HiAR students, inference only)", "",
            f"| context | drift score {n0}× | drift score {n1}× | ground change {n1}× | "
            f"hue error {n1}× | blobs' size {n1}× |", "|---|---|---|---|---|---|"]
    for name, e in (("t_{j+1} (HiAR's)", "HiAR, step-major"),
                    ("t_j", "HiAR, context t_j (inference only)"),
                    ("clean", "HiAR, context clean (inference only)")):
        out.append(f"| {name} | {evi(e, L0, 'score')} | {evi(e, L1, 'score')} | "
                   f"{evi(e, L1, 'ground_change')} | {evi(e, L1, 'hue_err')} | "
                   f"{evi(e, L1, 'size')} |")
    out += ["", "## 3. Forward KL alone (motion; the Self-Forcing-style student for reference)",
            "",
            f"| student | 1×: speed (px / frame) | 1×: frozen | {n0}×: speed | {n1}×: speed | "
            f"{n1}×: frozen |", "|---|---|---|---|---|---|"]
    out.append(f"| data | {dq('1x', 'speed')} | {dq('1x', 'frozen')} | {evi('data', L0, 'speed')} "
               f"| {evi('data', L1, 'speed')} | {evi('data', L1, 'frozen')} |")
    for name, q, e in students:
        out.append(f"| {name} | {qual(q, '1x', 'speed')} | {qual(q, '1x', 'frozen')} | "
                   f"{evi(e, L0, 'speed')} | {evi(e, L1, 'speed')} | {evi(e, L1, 'frozen')} |")
    return "\n".join(out) + "\n"


def long_videos(ev: dict) -> str:
    """What keeps a long video's look (docs/long_videos.md): each student with and without an
    attention sink (block 0 kept in the window, at inference only), the ground's change from the
    first block and blobs in the last window at 8× and 40× the training length."""
    L0, L1 = ev["lengths"]
    n0, n1 = L0 // (L1 // ev["args"]["long"]), ev["args"]["long"]
    head = (f"| rollout | ground change {n0}× | ground change {n1}× | blobs / frame {n0}× "
            f"(last window) | blobs / frame {n1}× (last window) | seeds (training × sampling) |")
    out = ["# Long videos: what keeps a clip's look", "",
           "Made by `python scripts/evidence.py --out docs` from docs/evidence.json. The ground "
           "is a "
           "frame's median colour; its change is the RGB distance of the last block's ground "
           "from the first block's (a clip's ground does not change in the data); blobs are "
           f"counted with `sample.find_blobs` in the last window ({L1 // n1} frames). Mean ± "
           "std over training seeds (each the mean of its sampling seeds); "
           f"{ev['args']['num']} videos a rollout, labels in turn. The sink rows keep block 0 in "
           "every KV cache at inference (`sink=True`, `sample.py --sink`); the students were "
           "trained without it.", "", head, "|---" * 6 + "|"]
    sinks = [r.label for r in ROWS if r.sink]             # each after its row without the sink
    labels = ["data"] + [x for q in sinks for x in (q.replace(" + sink", ""), q)]
    for label in labels:
        if label not in ev["rows"]:
            continue
        r0, r1 = _get(ev["rows"][label], L0), _get(ev["rows"][label], L1)
        ck = r1["ckpts"] or ["data"]
        cell = lambda r, k: fmt_row(r["measures"][k], ck) if k in r["measures"] else "–"  # noqa
        seeds = f"{len(r1['ckpts']) or '–'} × {len(r1['seeds'])}"
        out.append(f"| {label} | {cell(r0, 'ground_change')} | {cell(r1, 'ground_change')} | "
                   f"{cell(r0, 'blobs')} | {cell(r1, 'blobs')} | {seeds} |")
    return "\n".join(out) + "\n"


def plot_curves(ev: dict, path: Path, frames: int, train_frames: int):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -r requirements-notebooks.txt): no figure")
        return
    names = ["value", "saturation", "size", "background", "hue_err", "speed"]
    x = [(i + 0.5) * frames / CURVE_POINTS / train_frames for i in range(CURVE_POINTS)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    show = [k for k in CURVE_ROWS if k in ev["curves"]]
    colours = plt.cm.tab10.colors
    for ax, name in zip(axes.flat, names):
        d = torch.tensor(ev["curves"]["data"][name])
        s = torch.tensor(ev["curves"]["data"][name + "_std"])
        ax.fill_between(x, d - s, d + s, color="0.85", label="data (± spread between videos)")
        ax.plot(x, d, color="0.4", lw=1)
        for i, label in enumerate(show):
            ax.plot(x, ev["curves"][label][name], color=colours[i % 10],
                    ls="--" if "bias" in label else "-", lw=1.4, label=label)
        ax.set_title(f"{name}: {sample.DESCRIPTIONS[name]}", fontsize=8)
        ax.set_xlabel("time (× training length)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with sample.atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    print(f"wrote {path}")


if __name__ == "__main__":
    sample.run_cli(main)
