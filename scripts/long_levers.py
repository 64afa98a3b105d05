"""Long-video measures for any checkpoints: evidence.py's ground change (first block → last) and
blobs per frame in the last window, at 8× and 40× the training length, sampling seed 0.

    python scripts/long_levers.py runs/causal_s0/hiar.pt:step runs/causal_s0/hiar.pt:step:sink
    python scripts/long_levers.py hiar_s0:step self_forcing_s0:block:sink --out levers.json

Each argument is PATH:ORDER[:sink] (ORDER block or step; `sink`: block 0 stays in the window).
The videos are evidence.py's (8 per row, labels in turn, the same noise), so a row here is
comparable to that row's sampling seed 0 in docs/evidence.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import evidence  # noqa: E402
import sample  # noqa: E402


def parse(spec: str) -> tuple[str, str, bool]:
    path, _, rest = spec.partition(":")
    order, _, sink = rest.partition(":")
    if not path or order not in ("block", "step") or sink not in ("", "sink"):
        raise sample.CLIError(f"{spec}: expected PATH:ORDER[:sink], ORDER block or step")
    sample.resolve_ckpt(path)                          # exists, or a shipped student's name
    return path, order, sink == "sink"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="+", metavar="PATH:ORDER[:sink]")
    p.add_argument("--num", type=int, default=8, help="videos per row")
    p.add_argument("--out", default=None, help="also write the numbers here (json)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.num < 1 or args.threads < 1:
        raise sample.CLIError("--num and --threads must be >= 1")
    rows = [parse(s) for s in args.rows]
    if args.out:
        sample._writable(args.out, "--out")
    torch.set_num_threads(args.threads)
    out = {}
    print("| row | 8×: ground change / blobs | 40×: ground change / blobs |\n|---|---|---|")
    for path, order, sink in rows:
        model = sample.load_student(path, "cpu")[0]
        cfg = model.cfg
        row = evidence.Row(path, [path], order, "next" if order == "step" else "clean", sink=sink)
        lengths = [8 * cfg.frames, 40 * cfg.frames]
        res, _ = evidence.run_row({path: model}, [path], row, [0], args.num, lengths[-1],
                                  lengths, cfg)
        key = f"{path}, {order}-major" + (", sink" if sink else "")
        combined = {L: evidence.combine(res[L]) for L in lengths}
        out[key] = {str(L): {k: combined[L][k][0] for k in ("ground_change", "blobs", "frozen")}
                    for L in lengths}
        cells = [f"{out[key][str(L)]['ground_change']:.3f} / {out[key][str(L)]['blobs']:.2f}"
                 for L in lengths]
        print(f"| {key} | {cells[0]} | {cells[1]} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sample.run_cli(main)
