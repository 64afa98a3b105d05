"""The lever table of the DMD recipe search (docs/lab/distillation.md): one row per lever and EMA
snapshot, on scripts/quality.py's measure, from the quality.json it wrote for each lever run.

    python scripts/quality.py --ckpt runs/g1/self_forcing_ema*.pt:block --out runs/g1/quality.md
    python scripts/lab/levers.py docs/lab/levers/*.json > docs/lab/levers/table.md

Each json is named for its lever (g1.json: guidance 1, …); the rows keep quality.py's columns
and the verdict it had when the run was measured (the targets missed then: 1× ground change
<= 0.03, blobs >= the teacher's - 0.1, 8× spread >= half the data's; quality.py's TARGETS since
allow a change of 0.035 and a spread of 0.06).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sample  # noqa: E402

COLUMNS = ("bg_change", "blobs", "value", "radius")
LONG = ("spread_min", "in_range")


def step_of(name: str) -> int | None:
    """The generator step of an EMA snapshot's row (`…_ema150.pt, block-major` → 150); None for
    a run's final weights."""
    m = re.search(r"_ema(\d+)\.pt", name)
    return int(m.group(1)) if m else None


def rows(path: Path) -> list[str]:
    q = json.loads(path.read_text())
    out = []
    students = [(step_of(name), r) for name, r in q["rows"].items() if "miss" in r]
    for step, r in sorted(students, key=lambda sr: 10 ** 9 if sr[0] is None else sr[0]):
        cells = [f"{r['1x'][k]:.3f}" for k in COLUMNS] + [f"{r['long'][k]:.3f}" for k in LONG]
        out.append(f"| {path.stem} | {'final' if step is None else step} | {r['order']} | "
                   f"{r['guidance']:g} | " + " | ".join(cells)
                   + f" | {', '.join(r['miss']) or 'none'} |")
    return out


def main(paths):
    if not paths:
        raise sample.CLIError("give quality.json files (scripts/quality.py --out), one a lever")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise sample.CLIError(f"{p}: no such file")
    first = json.loads(paths[0].read_text())
    print(f"Lever runs on scripts/quality.py's measure ({first['num']} clips, sampling seed 0; "
          f"long = {first['long']}×). Reference rows:\n")
    print("| row | 1×: bg change | blobs / frame | value | radius | long: label spread (min) | "
          "long: in range |\n|---|---|---|---|---|---|---|")
    for name, r in first["rows"].items():
        if "miss" in r:
            continue
        long = [f"{r['long'][k]:.3f}" for k in LONG] if r.get("long") else ["–", "–"]
        print(f"| {name} | " + " | ".join(f"{r['1x'][k]:.3f}" for k in COLUMNS) + " | "
              + " | ".join(long) + " |")
    print("\n| lever | generator step | order | real-score CFG | 1×: bg change | blobs | value | "
          "radius | long: spread (min) | long: in range | misses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print("\n".join(rows(p)))


if __name__ == "__main__":
    sample.run_cli(lambda: main(sys.argv[1:]))
