"""The idea in one figure (docs/orders.png): the noise level of each cell's context, per order.

    python scripts/figure_orders.py                  # writes docs/orders.png (needs matplotlib)

Nothing here is drawn by hand: a small model runs `hiar.sample_block_major` and
`hiar.sample_step_major`, and a spy on its forward pass records every pass in the order the
sampler makes it — which block it denoises at which step, and the σ at which each context block
in its KV cache was written there (the figure's window holds every block). The figure is that record: one step × block grid
per order, each cell numbered by when it runs and coloured by its context's noise level; and the
step-major grid's anti-diagonals n + j, whose cells need only (n − 1, j) and (n, j − 1) and so can
run at once (the wavefront).
"""
from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiar  # noqa: E402
import sample  # noqa: E402


def record_cells(sampler, cfg: hiar.Config, frames: int, **kw) -> list[dict]:
    """Run `sampler` on a random model and return its denoising passes in order: for each,
    {"n": block, "j": step, "sigma": σ_j, "context": {block: σ it was written at}}."""
    torch.manual_seed(0)
    model = hiar.VideoDiT(cfg).eval()
    sigmas = hiar.student_sigmas(cfg.K, cfg.shift)
    written = weakref.WeakKeyDictionary()          # written[cache][block] = σ it was written at
    cells, forward = [], model.forward

    def level(s, i):                    # σ of frame i of a pass (a float or a per-frame tensor)
        if not torch.is_tensor(s) or s.dim() == 0:
            return float(s)
        return float(s.reshape(-1, s.shape[-1])[0, i])              # video 0's frame i

    def spy(x, sigma, label=None, frame0=0, cache=None, write_frames=0, **k):
        b, T = cfg.block, x.shape[1]
        if write_frames:                                   # a write: its block becomes context
            written.setdefault(cache, {})[frame0 // b] = level(sigma, 0)
        if T > write_frames:                               # a denoising pass of the last block
            n, s = (frame0 + T - 1) // b, level(sigma, T - 1)
            cells.append({"n": n, "j": min(range(cfg.K), key=lambda j: abs(sigmas[j] - s)),
                          "sigma": s, "context": dict(written.get(cache, {}) if cache is not None else {})})
        return forward(x, sigma, label, frame0=frame0, cache=cache, write_frames=write_frames,
                       **k)

    model.forward = spy
    with torch.no_grad():
        sampler(model, hiar.Noise(cfg, [0]), frames, torch.tensor([0]), **kw)
    return cells


def draw(out: Path, cfg: hiar.Config, N: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    K, sig = cfg.K, hiar.student_sigmas(cfg.K, cfg.shift)
    orders = {"block-major (CausVid, Self-Forcing)": record_cells(
                  hiar.sample_block_major, cfg, N * cfg.block),
              "step-major (HiAR, Alg. 1)": record_cells(
                  hiar.sample_step_major, cfg, N * cfg.block)}
    cmap, norm = plt.get_cmap("Blues_r"), colors.Normalize(0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6), gridspec_kw={"wspace": 0.28})
    for ax, (title, cells) in zip(axes, orders.items()):
        for i, c in enumerate(cells):
            ctx = sorted(set(c["context"].values()))
            shade = ctx[0] if ctx else None                  # one level per cell in both orders
            ax.add_patch(plt.Rectangle((c["n"], c["j"]), 1, 1, ec="k", lw=0.8,
                                       fc="#f2f2f2" if shade is None else cmap(norm(shade))))
            txt = "no context" if shade is None else f"ctx σ={shade:.2f}"
            dark = shade is not None and shade < 0.45
            ax.text(c["n"] + 0.5, c["j"] + 0.38, f"#{i + 1}", ha="center", va="center",
                    fontsize=11, weight="bold", color="w" if dark else "k")
            ax.text(c["n"] + 0.5, c["j"] + 0.72, txt, ha="center", va="center", fontsize=7.5,
                    color="w" if dark else "k")
        ax.set_title(title, fontsize=10.5)
    # the wavefront: step-major's cells grouped by anti-diagonal n + j
    cells = orders["step-major (HiAR, Alg. 1)"]
    tab = plt.get_cmap("tab10")
    for c in cells:
        d = c["n"] + c["j"]
        axes[2].add_patch(plt.Rectangle((c["n"], c["j"]), 1, 1, ec="k", lw=0.8,
                                        fc=colors.to_rgba(tab(d % 10), 0.45)))
        axes[2].text(c["n"] + 0.5, c["j"] + 0.5, f"slot {d + 1}", ha="center", va="center",
                     fontsize=9)
    axes[2].set_title(f"step-major as a wavefront: {N + K - 1} slots, not {N * K}", fontsize=10.5)
    for ax in axes:
        ax.set_xlim(0, N)
        ax.set_ylim(K, 0)
        ax.set_xticks([n + 0.5 for n in range(N)], [f"block {n}" for n in range(N)], fontsize=8)
        ax.set_yticks([j + 0.5 for j in range(K)], [f"step {j}\nσ_j={sig[j]:.2f}"
                                                   for j in range(K)], fontsize=8)
        ax.set_aspect("equal")
        ax.tick_params(length=0)
    fig.text(0.5, 0.1, "#: the order the cells run in.  Colour: the noise level σ of the "
             "context blocks a cell attends to (dark = clean).\nBlock-major: every context is "
             "clean, so a finished block's mistakes are confident context.  Step-major: at step j "
             "the context is at σ_{j+1},\nthe step's output level (Eq. 9).  Cell (n, j) needs "
             "only (n − 1, j) and (n, j − 1): the cells of an anti-diagonal (right) can run at "
             "once.",
             ha="center", va="top", fontsize=8.5)
    with sample.atomic(out) as tmp:                  # a whole file or the old one
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "orders.png"))
    p.add_argument("--blocks", type=int, default=5, help="blocks to draw (N)")
    args = p.parse_args(argv)
    sample.check(2 <= args.blocks <= 12, "--blocks", args.blocks, "must be an integer in [2, 12]")
    sample.check_outputs({f"--out {args.out}": args.out})
    cfg = hiar.Config.preset("smoke", K=4, frames=2 * args.blocks, window=2 * args.blocks)
    draw(Path(args.out), cfg, args.blocks)


if __name__ == "__main__":
    sample.run_cli(main)
