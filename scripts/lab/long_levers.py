"""Long-video measures for any checkpoints: evidence.py's ground change (first block → last) and
blobs per frame in the last window, at 8× and 40× the training length (`--lengths`), sampling
seed 0.

    python scripts/lab/long_levers.py runs/causal_s0/hiar.pt:step runs/causal_s0/hiar.pt:step:sink
    python scripts/lab/long_levers.py hiar_s0:step self_forcing_s0:block:sink --out levers.json
    python scripts/lab/long_levers.py hiar_s0:step:sink:current     # + context at t_j (Table 2)

Each argument is PATH:ORDER[:sink][:LEVEL] (ORDER block or step; `sink`: block 0 stays in the
window; LEVEL, step-major only: the context level next = t_{j+1}, current = t_j or clean; by
default the level the student was trained with, as sample.py and quality.py sample it).
The videos are evidence.py's (8 per row, labels in turn, the same noise), so a row here is
comparable to that row's sampling seed 0 in docs/evidence.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import evidence  # noqa: E402
import hiar  # noqa: E402
import sample  # noqa: E402


def parse(spec: str) -> tuple[str, str, bool, str | None]:
    """PATH:ORDER[:sink][:LEVEL] → (path, order, sink, context level; None: as trained)."""
    path, _, rest = spec.partition(":")
    order, *opts = rest.split(":")
    sink = opts[:1] == ["sink"]
    level = opts[sink:] or [None]
    if (not path or order not in ("block", "step") or len(level) > 1
            or level[0] not in (None, *(hiar.CONTEXT_LEVELS if order == "step" else ["clean"]))):
        raise sample.CLIError(f"{spec}: expected PATH:ORDER[:sink][:LEVEL], ORDER block or step, "
                              f"LEVEL (step-major only) one of {list(hiar.CONTEXT_LEVELS)}")
    sample.resolve_ckpt(path)                          # exists, or a shipped student's name
    return path, order, sink, level[0]


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="+", metavar="PATH:ORDER[:sink][:LEVEL]")
    p.add_argument("--num", type=int, default=8, help="videos per row")
    p.add_argument("--out", default=None, help="also write the numbers here (json)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 40],
                   help="lengths to measure, × the training length")
    args = p.parse_args(argv)
    sample.check_int("--num", args.num)
    sample.check_int("--threads", args.threads)
    if min(args.lengths) < 2:                   # evidence.py's drift meters need 5 blocks
        raise sample.CLIError(f"--lengths {min(args.lengths)}: must be >= 2 (× the training "
                              "length)")
    mults = sorted(set(args.lengths))
    rows = [parse(s) for s in args.rows]
    if args.out:
        sample.check_outputs({f"--out {args.out}": args.out},
                             {spec: sample.resolve_ckpt(path) for spec, (path, *_) in
                              zip(args.rows, rows)})
    torch.set_num_threads(args.threads)
    out = {}
    for path, order, sink, level in rows:
        model, meta = sample.load_student(path, "cpu")
        cfg = model.cfg
        if order == "block":
            level = "clean"                                  # block-major's context is clean
        level = level or sample.trained_level(meta, cfg)
        row = evidence.Row(path, [path], order, level, sink=sink)
        lengths = [m * cfg.frames for m in mults]
        if lengths[-1] < evidence.CURVE_POINTS * cfg.block:     # run_row's curve over the longest
            raise sample.CLIError(f"--lengths: the longest must be >= "
                                  f"{-(-evidence.CURVE_POINTS * cfg.block // cfg.frames)}")
        if not out:
            print("| row | " + " | ".join(f"{m}×: ground change / blobs" for m in mults)
                  + " |\n|---|" + "---|" * len(mults))
        res, _ = evidence.run_row({path: model}, [path], row, [0], args.num, lengths[-1],
                                  lengths, cfg)
        key = (f"{path}, {order}-major" + (", sink" if sink else "")
               + (f", context {level}" if order == "step" and level != "next" else ""))
        combined = {L: evidence.combine(res[L]) for L in lengths}
        out[key] = {str(L): {k: combined[L][k][0] for k in ("ground_change", "blobs", "frozen")}
                    for L in lengths}
        cells = [f"{out[key][str(L)]['ground_change']:.3f} / {out[key][str(L)]['blobs']:.2f}"
                 for L in lengths]
        print(f"| {key} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        sample.write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    sample.run_cli(main)
