"""Sample long videos from trained checkpoints, write a labelled GIF, print drift metrics.

    python sample.py                                  # block-major vs step-major, shipped HiAR
    python sample.py --ckpt self_forcing --sampler block --frames 192 --gif sf.gif
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import hiar

# ------------------------------------------------------------------------------------------------
# Video helpers: uint8 frames, labelled grids, GIFs
# ------------------------------------------------------------------------------------------------


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, T, 3, H, W) in [-1, 1] → (B, T, H, W, 3) uint8."""
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).numpy()


def _label(text: str, width: int, height: int = 11) -> np.ndarray:
    """A strip with `text` in white on dark grey (PIL comes with imageio)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (40, 40, 40))
    ImageDraw.Draw(img).text((2, 0), text, fill=(255, 255, 255))
    return np.asarray(img)


def grid_frames(rows: dict, scale: int = 4, per_row: int = 1, gap: int = 2) -> np.ndarray:
    """Stack labelled rows of videos into one video. rows: {label: uint8 (n, T, H, W, 3)}, each
    row shows `per_row` videos side by side. Returns (T, H', W', 3) uint8."""
    T = min(v.shape[1] for v in rows.values())
    blocks = []
    for label, v in rows.items():
        v = v[:per_row, :T].repeat(scale, 2).repeat(scale, 3)        # (n, T, sH, sW, 3)
        pad = np.zeros((v.shape[0], T, v.shape[2], gap, 3), np.uint8)
        row = np.concatenate([np.concatenate([x, p], 2) for x, p in zip(v, pad)], 2)
        strip = np.broadcast_to(_label(label, row.shape[2]), (T,) + _label(label, row.shape[2]).shape)
        blocks += [strip, row, np.zeros((T, gap, row.shape[2], 3), np.uint8)]
    width = max(b.shape[2] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, 0), (0, width - b.shape[2]), (0, 0))) for b in blocks]
    return np.concatenate(blocks, 1)


def save_gif(path, frames: np.ndarray, fps: int = 8):
    import imageio.v2 as imageio
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(frames), duration=1 / fps, loop=0)
