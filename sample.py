"""Sample long videos from a checkpoint, streamed to disk, with drift metrics against the data.

    python sample.py                                   # ODE-init student, block- vs step-major
    python sample.py --ckpt ode_init --sampler block --frames 6000 --npy long.npy --gif ''
    python sample.py --bias 0.03                       # a known x0 bias: watch it compound

Frames are written as they are made (npy through a memory map, GIF and MP4 frame by frame), so
memory stays flat however long the video; each file under a temporary name until it is whole, so
Ctrl-C or a full disk leaves the old files as they were. Also the scripts' shared pieces: one
error type, the argument checks, safe writes, device choice, the checkpoint loader, video helpers
and the drift metrics (train_toy.py and scripts/ import them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hiar

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "checkpoints"


def repo_path(path) -> str:
    """A path as reports and logs write it: relative to the repository when inside it, so what
    they print does not carry the machine it was made on; otherwise as given, resolved."""
    p = Path(path).resolve()
    return str(p.relative_to(HERE)) if p.is_relative_to(HERE) else str(p)

# ------------------------------------------------------------------------------------------------
# Shared by the scripts: one error type, device choice, one checkpoint loader
# ------------------------------------------------------------------------------------------------


class CLIError(RuntimeError):
    """A failure the user sees as one line: a bad flag value, a missing or foreign file, a NaN."""


def other_rank() -> bool:
    """Under torchrun every process checks the same arguments before they meet, and fails
    alike: only rank 0 says why."""
    import torch.distributed as dist
    return int(os.environ.get("RANK", 0)) > 0 and not (dist.is_available()
                                                        and dist.is_initialized())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (`--frames abc`) are CLIErrors too: one line like the rest."""

    def error(self, message):
        raise CLIError(message)


def run_cli(main, interrupted: str = "nothing was overwritten"):
    """A script's entry point: bad input (a CLIError) is one line on stderr and exit status 2, a
    failed write (a full disk) one line and 1, Ctrl-C one line and 130 (outputs are written by
    `atomic`, so neither leaves a file changed or half written)."""
    try:
        main()
    except CLIError as e:
        if not other_rank():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                             # a full disk, a file gone or locked
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:                   # its text, if any: what became of the work
        print(f"interrupted {e}" if str(e) else f"interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)

# ------------------------------------------------------------------------------------------------
# Shared by the scripts: argument checks (before any file is opened) and safe outputs
# ------------------------------------------------------------------------------------------------


SEEDS = 2 ** 63     # seeds fit 63 bits: torch.Generator takes < 2**64, and run seeds add a little


def check(ok: bool, flag: str, value, allowed: str):
    """One argument: a one-line CLIError naming the flag, its value and what is allowed."""
    if not ok:
        raise CLIError(f"{flag} {value}: {allowed}")


def check_int(flag: str, value, low: int = 1):
    check(isinstance(value, int) and value >= low, flag, value, f"must be an integer >= {low}")


def check_seed(flag: str, value):
    check(isinstance(value, int) and 0 <= value < SEEDS, flag, value,
          "must be an integer in [0, 2**63 - 1] (seeds fit 63 bits)")


def check_number(flag: str, value, low: float | None = None, high: float | None = None,
                 above: bool = False):
    """A finite number in [low, high] (`above`: strictly above low)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        low is None or (value > low if above else value >= low)) and (high is None or value <= high)
    rule = []
    if low is not None:
        rule.append(f"{'>' if above else '>='} {low:g}")
    if high is not None:
        rule.append(f"<= {high:g}")
    check(ok, flag, value, " ".join(["must be a finite number", " and ".join(rule)]).strip())


def same_file(a, b) -> bool:
    """Do two paths name one file (also through links, or a hard link to it)?"""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def _check_writable(what: str, folder: Path):
    """A file can be made in `folder`, or in its nearest existing parent if it is still to be
    made (atomic makes it when the output is written): a probe file, removed at once."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        probe = folder / f".{os.getpid()}.write_test.tmp"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CLIError(f"{what}: cannot write there ({e.strerror})") from None


def check_outputs(outputs: dict, inputs: dict | None = None) -> dict:
    """Every output path before any work: not a directory, its folder writable, no two outputs
    on one path and none on an input; nothing is made or touched. outputs, inputs: {what the
    user typed (e.g. '--npy v.npy'): path} → outputs as Paths."""
    out = {}
    for what, path in outputs.items():
        p = Path(path)
        if p.is_dir():
            raise CLIError(f"{what}: is a directory; give a file name")
        for other, q in out.items():
            if same_file(p, q):
                raise CLIError(f"{what}: is also {other}; give each output its own file")
        for other, q in (inputs or {}).items():
            if same_file(p, q):
                raise CLIError(f"{what}: would overwrite the input {other}")
        out[what] = p
    for what, p in out.items():
        _check_writable(what, p.parent)
    return out


def check_dir(flag: str, path) -> Path:
    """An output folder that can be written to (made when the first output is written)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {path}: is a file; give a directory")
    _check_writable(f"{flag} {path}", p)
    return p


@contextlib.contextmanager
def atomic(path):
    """Every output is written through this: yields a temporary path beside `path`
    (`<name>.tmp`) that becomes `path` by a rename when the block ends; after an error or an
    interrupt the temporary file is removed and the old `path` stays as it was. So no reader
    ever sees half a file, and no half-written file looks whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)                    # gone already after a success


def write_text(path, text: str):
    with atomic(path) as tmp:
        tmp.write_text(text)


def pick_device(name: str | None = None) -> torch.device:
    """cuda > mps > cpu unless `name` says otherwise."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise CLIError(f"--device {name!r} is not a device ({e})") from None
        if dev.type == "cuda" and (not torch.cuda.is_available()
                                   or (dev.index or 0) >= torch.cuda.device_count()):
            raise CLIError(f"--device {name}: that CUDA device is not available here")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                      and torch.backends.mps.is_available()):
            raise CLIError(f"--device {name}: MPS is not available here")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise CLIError(f"--device {name}: choose cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_checkpoint(path) -> dict:
    """torch.load with weights_only=True; a missing, truncated or foreign file is a CLIError."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"checkpoint {path} could not be read ({first})") from None


def model_from_checkpoint(ck: dict, path, key: str = "model") -> hiar.VideoDiT:
    """The network stored in a checkpoint dict (weights under `key`, else "model")."""
    try:
        model = hiar.VideoDiT(hiar.Config(**ck["config"]))
        model.load_state_dict({k: v.float() for k, v in ck.get(key, ck["model"]).items()})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"checkpoint {path} does not hold a model of this code ({first})") from None
    return model


def make_config(preset: str, **overrides) -> hiar.Config:
    """A hiar.Config from a preset and what a user typed (--set), every field checked first: a
    bad value is a ValueError that names the field, the value and what is allowed."""
    if preset not in hiar.PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(hiar.PRESETS)}")
    d = {**hiar.Config().to_dict(), **hiar.PRESETS[preset], **overrides}
    unknown = sorted(set(d) - set(hiar.Config().to_dict()))
    if unknown:
        raise ValueError(f"unknown Config fields {unknown}")

    def need(ok, name, allowed):
        if not ok:
            raise ValueError(f"Config.{name}={d[name]!r} is invalid: {allowed}")
    for name in ("size", "frames", "block", "shapes", "patch", "dim", "depth", "heads", "K"):
        v = d[name]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
             "must be an integer >= 1")
    need(isinstance(d["labels"], int) and d["labels"] >= 0, "labels", "must be an integer >= 0")
    need(d["frames"] % d["block"] == 0, "frames", f"must be a multiple of block={d['block']}")
    need(d["window"] or d["frames"] > d["block"], "frames",
         f"must hold two blocks or more (> block={d['block']}): the window needs context")
    need(d["size"] % d["patch"] == 0, "patch", f"must divide size={d['size']}")
    need(d["dim"] % d["heads"] == 0 and (d["dim"] // d["heads"]) % 2 == 0, "heads",
         f"must divide dim={d['dim']} into an even head size (RoPE rotates pairs)")
    w = d["window"]
    need(isinstance(w, int) and w >= 0 and w % d["block"] == 0, "window",
         f"must be 0 (= frames) or a positive multiple of block={d['block']}")
    need(w == 0 or w > d["block"], "window", f"must leave room for context: > block={d['block']}")
    need(d["context_t"] in hiar.CONTEXT_LEVELS, "context_t",
         f"must be one of {hiar.CONTEXT_LEVELS}")
    need(isinstance(d["shift"], (int, float)) and 0 < d["shift"] < math.inf, "shift",
         "must be a finite number > 0")
    ceilings = {"blob_sigma": None, "speed": None, "saturation": 1, "value": 1, "background": 1}
    for name, ceil in ceilings.items():
        r, strict = d[name], name in ("blob_sigma", "speed")
        ok = (isinstance(r, (tuple, list)) and len(r) == 2
              and all(isinstance(x, (int, float)) and math.isfinite(x) for x in r)
              and 0 <= r[0] <= r[1]
              and (not strict or r[0] > 0) and (ceil is None or r[1] <= ceil))
        need(ok, name, f"must be a (low, high) pair, 0 {'<' if strict else '<='} low <= high"
             + (f" <= {ceil}" if ceil is not None else ""))
    need(d["blob_sigma"][1] * 2 < d["size"], "blob_sigma", f"must be < size/2={d['size'] / 2}")
    return hiar.Config(**d)


def resolve_ckpt(name: str) -> Path:
    """A path, or the name of a shipped checkpoint (see checkpoints/)."""
    p = Path(name)
    if p.suffix == ".pt" or p.exists():
        if not p.is_file():
            raise CLIError(f"--ckpt {name}: no such file")
        return p
    shipped = SHIPPED / f"{name}.pt"
    if not shipped.is_file() and (SHIPPED / f"{name}_s0.pt").is_file():
        shipped = SHIPPED / f"{name}_s0.pt"             # a student's first training seed
    if not shipped.is_file():
        have = sorted(q.stem for q in SHIPPED.glob("*.pt") if q.stem != "teacher")
        raise CLIError(f"--ckpt {name}: not a file and not a shipped student {have}")
    return shipped


def trained_level(meta: dict, cfg: hiar.Config) -> str:
    """The context level a step-major student samples with unless told otherwise: the one it was
    trained with (load_student's meta), else the config's."""
    return meta.get("context_t") or cfg.context_t


def config_diff(a: dict, b: dict, keys=None) -> list[str]:
    keys = sorted(set(a) | set(b)) if keys is None else keys
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v     # noqa: E731
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if norm(a.get(k)) != norm(b.get(k))]


NETWORK_FIELDS = [f.name for f in dataclasses.fields(hiar.Config)
                  if f.name not in hiar.SAMPLER_FIELDS]


def check_network(ck: dict, cfg: hiar.Config, path):
    """A checkpoint's network and data must be `cfg`'s (its sampler fields may differ)."""
    diff = config_diff(ck["config"], cfg.to_dict(), NETWORK_FIELDS)
    if diff:
        raise CLIError(f"{path} was made with a different config ({'; '.join(diff)})")


def check_checkpoint(ck, path, flag: str, stages=None, like: hiar.Config | None = None):
    """A checkpoint of this project, of one of `stages` (None: any) and, given `like`, with its
    network: what a flag that names a checkpoint needs."""
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise CLIError(f"{flag} {path}: not a checkpoint of this project")
    if stages is not None and ck.get("stage") not in stages:
        raise CLIError(f"{flag} {path}: is a checkpoint of stage {ck.get('stage')}; give one "
                       f"of stage {' or '.join(stages)}")
    if like is not None:
        check_network(ck, like, f"{flag} {path}")


def load_student(name: str, device, like: hiar.Config | None = None) -> tuple[hiar.VideoDiT, dict]:
    """The sampling weights (EMA where present) and how the checkpoint was made: its stage, and
    for a DMD student its sampler order and context level. `like`: the network it must have."""
    path = resolve_ckpt(name)
    ck = load_checkpoint(path)
    check_checkpoint(ck, path, "--ckpt")
    if ck.get("stage") in ("teacher", "ar_teacher"):
        raise CLIError(f"--ckpt {path}: is the {ck['stage']}; sample a student "
                       f"(shipped: {sorted(q.stem for q in SHIPPED.glob('*.pt'))[:8]})")
    if like is not None:
        check_network(ck, like, f"--ckpt {path}")
    model = model_from_checkpoint(ck, path, "ema")
    meta = {k: ck[k] for k in ("stage", "order", "fkl_weight", "context_t", "note", "seed")
            if k in ck}
    return model.to(device).eval(), meta


# ------------------------------------------------------------------------------------------------
# Video helpers: uint8 frames, labelled grids, writers that stream frame by frame
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
        text = _label(label, row.shape[2])
        strip = np.broadcast_to(text, (T,) + text.shape)
        blocks += [strip, row, np.zeros((T, gap, row.shape[2], 3), np.uint8)]
    width = max(b.shape[2] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, 0), (0, width - b.shape[2]), (0, 0))) for b in blocks]
    return np.concatenate(blocks, 1)


class GifWriter:
    """An animated GIF written frame by frame, so memory does not grow with its length: PIL
    encodes each frame on its own, and its colour table becomes that frame's local table."""

    def __init__(self, path, fps: int = 8):
        self.f, self.delay, self.started = open(path, "wb"), max(1, round(100 / fps)), False

    def append(self, frame: np.ndarray):
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="GIF")
        b = buf.getvalue()
        packed = b[10]                                       # logical screen descriptor flags
        size = 3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0
        table, i = b[13:13 + size], 13 + size
        while b[i] == 0x21:                                  # skip PIL's extension blocks
            i += 2
            while b[i]:
                i += b[i] + 1
            i += 1
        desc = bytearray(b[i:i + 10])                        # image descriptor
        if not desc[9] & 0x80:                               # move the global table into it
            desc[9] = (desc[9] & 0x40) | 0x80 | (packed & 7)
        else:
            table = b""
        if not self.started:
            self.f.write(b"GIF89a" + b[6:10] + b"\x00\x00\x00")          # no global table
            self.f.write(b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
            self.started = True
        self.f.write(b"\x21\xf9\x04\x04" + self.delay.to_bytes(2, "little") + b"\x00\x00")
        self.f.write(bytes(desc) + table + b[i + 10:-1])     # the frame's data, no trailer

    def close(self):
        self.f.write(b"\x3b")
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, error, *_):                     # the trailer only on a whole GIF
        self.close() if error is None else self.f.close()


def save_gif(path, frames: np.ndarray, fps: int = 8):
    """Write (T, H, W, 3) uint8 frames as a looping GIF (atomically)."""
    with atomic(path) as tmp, GifWriter(tmp, fps) as w:
        for fr in frames:
            w.append(fr)


# ------------------------------------------------------------------------------------------------
# Drift metrics: toy ground truth instead of the paper's image-quality networks. The paper's
# drift: split a long video into 5 segments; the drift of a measure is the slope of a linear fit
# of its segment means. Every appearance attribute of a clip persists in the data, so a clip's
# own first block is its truth: hue error is measured against it, and value, saturation, size and
# background should stay level.
# ------------------------------------------------------------------------------------------------

FG = 0.15     # a pixel belongs to a blob if its RGB differs from the background's by more
MEASURES = ("hue_err", "value", "saturation", "size", "background", "speed", "jump")
DESCRIPTIONS = {
    "hue_err": "blob hue vs the nearest blob of the clip's first block (turns)",
    "value": "blob brightness: HSV value at each blob's peak",
    "saturation": "blob HSV saturation at the peak",
    "size": "blob radius from its half-maximum area (pixels)",
    "background": "background level (median pixel, mean of RGB)",
    "speed": "blob speed: tracked centroid displacement (pixels / frame)",
    "jump": "frame change at block boundaries / within blocks (1 = seamless)",
}
# The drift score's measures: the attribute levels, whose spread between data videos is a natural
# unit (how much one clip differs from another). The two error measures are reported on their
# own: the data has no seams and no hue error by construction, so their spread between data
# videos (~0.002-0.003) is a noise floor, 20-100× below the others', and either would dominate.
SCORED = ("value", "saturation", "size", "background", "speed")
FROZEN = 0.25     # pixels / frame: a clip whose blobs move slower is frozen (the slowest of 256
#                   data clips moves 0.29, the data's mean 0.67)


def _rgb(video):
    """(B, T, 3, H, W) in [-1, 1] → (B, T, H, W, 3) in [0, 1]."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2)


def rgb_to_hsv(p):
    """RGB (…, 3) in [0, 1] → hue (turns), saturation, value, each (…)."""
    r, g, b = p.unbind(-1)
    v, lo = p.amax(-1), p.amin(-1)
    c = v - lo
    safe = c.clamp(min=1e-6)
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2,
                                                              (r - g) / safe + 4)) / 6
    return torch.where(c > 0, h % 1, torch.zeros_like(h)), c / v.clamp(min=1e-6), v


def find_blobs(video, shapes: int) -> dict:
    """Up to `shapes` blobs per frame, found without knowing the truth: the background is the
    median colour; a blob is a local maximum of the colour distance to it; its region is the
    pixels nearest to its peak above half the peak's distance (its half-maximum area).
    video (B, T, 3, H, W) → dict of background (B, T, 3); per blob (B, T, S): valid, hue,
    saturation, value (HSV of the peak pixel), radius, and centre (B, T, S, 2) as (x, y)."""
    p = _rgb(video)
    B, T, H, W, _ = p.shape
    bg = p.flatten(2, 3).median(2).values                                   # (B, T, 3)
    dist = (p - bg[:, :, None, None]).norm(dim=-1)                          # (B, T, H, W)
    flat = dist.reshape(B * T, 1, H, W)
    is_peak = (flat == F.max_pool2d(flat, 3, 1, 1)).reshape(B, T, H * W) & (
        dist.reshape(B, T, H * W) > FG)
    score, idx = torch.where(is_peak, dist.reshape(B, T, -1), -1.0).topk(shapes, -1)  # (B,T,S)
    valid = score > FG
    peak_rgb = p.reshape(B, T, H * W, 3).gather(2, idx[..., None].expand(-1, -1, -1, 3))
    hue, sat, val = rgb_to_hsv(peak_rgb)
    ys = torch.arange(H, device=p.device, dtype=torch.float32)[:, None]
    xs = torch.arange(W, device=p.device, dtype=torch.float32)[None, :]
    d2 = ((ys - (idx // W)[..., None, None]) ** 2 + (xs - (idx % W)[..., None, None]) ** 2)
    d2 = d2.masked_fill(~valid[..., None, None], float("inf"))              # (B, T, S, H, W)
    owner = F.one_hot(d2.argmin(2), shapes).permute(0, 1, 4, 2, 3).bool()  # (B, T, S, H, W)
    region = owner & (dist[:, :, None] > 0.5 * score[..., None, None])
    area = region.sum((-1, -2)).float()
    radius = (area / (2 * math.pi * math.log(2))).sqrt()  # half-max area of a Gaussian: 2π·ln2·σ²
    w = dist[:, :, None] * region
    mass = w.sum((-1, -2)).clamp(min=1e-6)
    centre = torch.stack([(w * xs).sum((-1, -2)) / mass, (w * ys).sum((-1, -2)) / mass], -1)
    return dict(background=bg, valid=valid, hue=hue, saturation=sat, value=val, radius=radius,
                centre=centre)


def _mean_valid(x, valid):
    """Mean over blobs (last dim) of the valid ones; NaN where a frame has none. (B, T)"""
    n = valid.sum(-1)
    s = torch.where(valid, x, torch.zeros_like(x)).sum(-1)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


class DriftMeter:
    """Per-frame measures of a video fed block by block (any number of frames at a time), summed
    per segment, so a video of any length is measured in flat memory.
    result() → {measure: (level (B,), drift (B,))}: level = mean over the video, drift = slope of
    the segment means per segment (paper's definition, 5 segments)."""

    def __init__(self, frames: int, block: int, shapes: int, segments: int = 5):
        if frames < segments * block:
            raise ValueError(f"frames={frames} is too short for {segments} segments of at least "
                             f"one block ({block} frames)")
        self.frames, self.block, self.shapes, self.segments = frames, block, shapes, segments
        self.seg_len = frames // segments
        self.t, self.prev, self.ref_hue, self.sums = 0, None, None, {}

    def _add(self, name: str, values):
        """Accumulate per-frame values (B, T') of the frames self.t … into their segments."""
        B, T = values.shape
        seg = torch.arange(self.t, self.t + T) // self.seg_len
        keep = seg < self.segments                      # frames past the last segment: ignored
        s, c = self.sums.setdefault(name, (torch.zeros(B, self.segments),
                                           torch.zeros(B, self.segments)))
        ok = torch.isfinite(values) & keep
        s.index_add_(1, seg.clamp(max=self.segments - 1), torch.where(ok, values, 0.0))
        c.index_add_(1, seg.clamp(max=self.segments - 1), ok.float())

    @torch.no_grad()
    def update(self, chunk):
        """chunk (B, T', 3, H, W) in [-1, 1]: the next T' frames of the videos."""
        chunk = chunk.detach().float().cpu()
        blobs = find_blobs(chunk, self.shapes)
        if self.ref_hue is None:                        # the clip's own truth: its first block
            first = slice(0, self.block)
            self.ref_hue = blobs["hue"][:, first].flatten(1)
            self.ref_ok = (blobs["valid"] & (blobs["saturation"] > 0.2))[:, first].flatten(1)
        diff = (blobs["hue"][..., None] - self.ref_hue[:, None, None]).abs()
        circ = torch.minimum(diff, 1 - diff).masked_fill(~self.ref_ok[:, None, None], 1.0)
        self._add("hue_err", _mean_valid(circ.amin(-1), blobs["valid"]))
        for name in ("value", "saturation"):
            self._add(name, _mean_valid(blobs[name], blobs["valid"]))
        self._add("size", _mean_valid(blobs["radius"], blobs["valid"]))
        self._add("background", blobs["background"].mean(-1))
        # speed: each blob to the nearest blob of the frame before; jump: change at block starts
        prev_frame = chunk[:, :1] if self.prev is None else self.prev[0]
        prev_centre = blobs["centre"][:, :1] if self.prev is None else self.prev[1]
        prev_valid = blobs["valid"][:, :1] if self.prev is None else self.prev[2]
        c_prev = torch.cat([prev_centre, blobs["centre"][:, :-1]], 1)        # (B, T', S, 2)
        v_prev = torch.cat([prev_valid, blobs["valid"][:, :-1]], 1)
        step = (blobs["centre"][..., :, None, :] - c_prev[..., None, :, :]).norm(dim=-1)
        step = step.masked_fill(~v_prev[..., None, :], float("inf")).amin(-1)  # (B, T', S)
        speed = _mean_valid(step, blobs["valid"] & torch.isfinite(step))
        change = (chunk - torch.cat([prev_frame, chunk[:, :-1]], 1)).abs().mean((2, 3, 4)) / 2
        t = torch.arange(self.t, self.t + chunk.shape[1])
        if self.prev is None:                           # the first frame has no predecessor
            speed[:, 0], change[:, 0] = float("nan"), float("nan")
        self._add("speed", speed)
        boundary = (t % self.block == 0)[None].expand_as(change)
        self._add("change_boundary", torch.where(boundary, change, float("nan")))
        self._add("change_inside", torch.where(~boundary, change, float("nan")))
        self.prev = (chunk[:, -1:], blobs["centre"][:, -1:], blobs["valid"][:, -1:])
        self.t += chunk.shape[1]

    def result(self) -> dict:
        if self.t < self.seg_len * self.segments:
            raise ValueError(f"only {self.t} of {self.seg_len * self.segments} frames measured")
        seg = {k: torch.where(c > 0, s / c.clamp(min=1), float("nan"))     # NaN: no frame
               for k, (s, c) in self.sums.items()}
        # a segment without a block boundary (frame 0 has no predecessor) has no jump
        seg["jump"] = seg.pop("change_boundary") / seg.pop("change_inside").clamp(min=1e-6)
        out = {}
        for name in MEASURES:
            level = seg[name].nanmean(-1) if name == "jump" else (
                self.sums[name][0].sum(-1) / self.sums[name][1].sum(-1).clamp(min=1))
            out[name] = (level, drift_slope(seg[name]))
        return out


def drift_slope(seg):
    """Slope of the least-squares line through segment values (B, S) against 0..S−1 → (B,);
    NaN segments (nothing measured there) are left out."""
    ok = ~seg.isnan()
    x = torch.arange(seg.shape[-1], dtype=seg.dtype, device=seg.device).expand_as(seg)
    x = torch.where(ok, x - (x * ok).sum(-1, keepdim=True) / ok.sum(-1, keepdim=True), 0.0)
    y = torch.where(ok, seg - seg.nanmean(-1, keepdim=True), 0.0)
    return (x * y).sum(-1) / (x * x).sum(-1)


def drift_metrics(video, block: int, shapes: int, segments: int = 5) -> dict:
    """{measure: (level (B,), drift (B,))} of a whole video (B, T, 3, H, W)."""
    meter = DriftMeter(video.shape[1], block, shapes, segments)
    meter.update(video)
    return meter.result()


def data_spread(data: dict) -> dict:
    """Each scored measure's spread between data videos: the std of its level (floor 1e-3)."""
    return {name: max(float(data[name][0].std()), 1e-3) for name in SCORED}


def drift_score(result: dict, data: dict | None = None, spread: dict | None = None
                ) -> torch.Tensor:
    """One number per video: the mean over the SCORED measures of |drift| in units of the data's
    spread between videos (`data_spread(data)`, or `spread` given), so a measure whose data
    level is tiny cannot dominate; 0 = no drift. (B,)"""
    spread = spread or data_spread(data)
    return torch.stack([result[name][1].abs() / spread[name] for name in SCORED]).mean(0)


def metric_table(results: dict, data_key: str = "data") -> str:
    """Markdown: per video set, each measure's level and drift (mean ± std over videos), and the
    composite drift score."""
    data = results[data_key]
    lines = ["| video | " + " | ".join(MEASURES) + " | drift score |",
             "|---" * (len(MEASURES) + 2) + "|"]
    for label, m in results.items():
        cells = [f"{m[n][0].nanmean():.3f} ({m[n][1].nanmean():+.4f})" for n in MEASURES]
        if len(data[SCORED[0]][0]) < 2:                 # its unit needs two data videos
            cells.append("– (needs -n >= 2)")
        else:
            score = drift_score(m, data)
            cells.append(f"{score.mean():.2f} ± {score.std():.2f}" if len(score) > 1
                         else f"{score.mean():.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nEach cell: mean level (drift = slope per segment over 5 "
                              "segments). Drift score: mean |drift| of " + ", ".join(SCORED)
                              + " in units of the data's spread between videos, ± std over "
                              "videos (hue_err and jump are reported, not scored).")


# ------------------------------------------------------------------------------------------------
# Streaming generation: a sampler as a stream of blocks
# ------------------------------------------------------------------------------------------------

SAMPLER_NAMES = ("block", "step", "pipelined", "wavefront")


def block_stream(model, sampler: str, noise, frames: int, label, context_t: str,
                 streams: int = 2, x0_bias=0.0, sink: bool = False):
    """The named sampler as a generator of finished blocks (B, b, 3, H, W); `sink`: block 0
    stays in the rolling window (hiar.KVCache)."""
    if sampler == "block":
        return hiar.block_major(model, noise, frames, label, x0_bias=x0_bias, sink=sink)
    if sampler == "step":
        return hiar.step_major(model, noise, frames, label, context_t, x0_bias=x0_bias, sink=sink)
    if sampler == "wavefront":                         # step-major, a batched pass a diagonal
        return hiar.wavefront(model, noise, frames, label, context_t, x0_bias=x0_bias, sink=sink)
    if x0_bias:
        raise CLIError("--bias is not available with --sampler pipelined; use step (the same "
                       "video)")
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return distributed(model, noise, frames, label, context_t, sink=sink)
    except ImportError:
        pass
    return hiar.pipelined(model, noise, frames, label, context_t, streams=streams, sink=sink)


def pipeline_schedule(N: int, K: int, S: int) -> list[dict]:
    """hiar.pipelined's wavefront as a table: stream s runs block n (its group of steps) in time
    slot n + s, if a stage takes one slot; N blocks take N + S − 1 slots instead of N·S."""
    return [dict(slot=n + s, stream=s, block=n, steps=list(g))
            for s, g in enumerate(hiar.step_groups(K, S)) for n in range(N)]


@torch.no_grad()
def distributed(model, noise, frames: int, label=None, context_t: str = "next",
                fused: bool = False, sink: bool = False):
    """hiar.pipelined's wavefront across processes: rank s of S (torch.distributed, started with
    `torchrun --nproc_per_node=S`) runs stage s (`hiar.step_major` on its group of steps) and
    passes each block to rank s + 1 — the path for a model that outgrows one device. Every rank
    draws the same per-video noise; the last rank yields the finished blocks, the others none."""
    import torch.distributed as dist
    S, s = dist.get_world_size(), dist.get_rank()
    N = frames // model.cfg.block

    def receive():
        x = torch.empty((noise.batch,) + noise.shape, device=noise.device)
        dist.recv(x, src=s - 1)
        return x

    inputs = (noise(0, n) if s == 0 else receive() for n in range(N))
    for x in hiar.step_major(model, noise, frames, label, context_t, fused=fused,
                             steps=hiar.step_groups(noise.K, S)[s], inputs=inputs, sink=sink):
        if s + 1 < S:
            dist.send(x.contiguous(), dst=s + 1)
        else:
            yield x


def data_stream(cfg: hiar.Config, num: int, seed: int, frames: int, label):
    """Ground-truth clips with the same labels, block by block (flat memory)."""
    for n in range(frames // cfg.block):
        g = torch.Generator().manual_seed(seed)
        yield hiar.moving_shapes(cfg, num, g, cfg.block, label, start=n * cfg.block)[0]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="ode_init", help="checkpoint path or shipped name")
    p.add_argument("--sampler", default=None, help="block, step, pipelined or wavefront "
                   "(step-major, a batched pass per anti-diagonal; default: the checkpoint's own "
                   "order; both side by side for the ODE-init student)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video (default 8× the training length); a last partial "
                        "block is generated whole and cut")
    p.add_argument("-n", "--num", type=int, default=4, help="number of videos")
    p.add_argument("--seed", type=int, default=0, help="video i uses noise seed (seed, i)")
    p.add_argument("--label", default=None, help="colour family 0..labels-1 for every video, or "
                   "'none' (unconditional); default: video i gets i mod labels")
    p.add_argument("--context-t", default=None, help="step-major context level: current (t_j), "
                   "next (t_{j+1}) or clean (default: the checkpoint's)")
    p.add_argument("--streams", type=int, default=2, help="pipelined: number of streams")
    p.add_argument("--bias", type=float, default=0.0, help="add this constant to every x0 "
                   "prediction: a stand-in for a model's systematic error (default 0)")
    p.add_argument("--gif", default="samples/sample.gif", help="GIF to write ('' = none)")
    p.add_argument("--npy", default=None, help="write uint8 videos (num, T, H, W, 3), one file "
                   "per sampler (memory-mapped, streamed)")
    p.add_argument("--mp4", default=None, help="write an MP4 of the grid (needs the optional "
                   "imageio-ffmpeg: pip install imageio-ffmpeg)")
    p.add_argument("--sink", action="store_true", help="keep block 0 in the rolling window, an "
                   "attention sink (StreamingLLM, LongLive): it changes videos past the window")
    p.add_argument("--no-metrics", action="store_true", help="skip the drift metrics table")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: autodetect)")
    return p.parse_args(argv)


def check_args(args, cfg: hiar.Config, meta: dict) -> dict:
    """Every flag checked against the model before generating; returns the resolved choices."""
    samplers = ([args.sampler] if args.sampler else
                [meta["order"]] if meta.get("order") else ["block", "step"])
    for s in samplers:
        if s not in SAMPLER_NAMES:
            raise CLIError(f"--sampler {s!r}: choose one of {', '.join(SAMPLER_NAMES)}")
    context_t = args.context_t or trained_level(meta, cfg)
    if context_t not in hiar.CONTEXT_LEVELS:
        raise CLIError(f"--context-t {context_t!r}: choose one of {', '.join(hiar.CONTEXT_LEVELS)}")
    frames = 8 * cfg.frames if args.frames is None else args.frames
    check_int("--frames", frames)
    check_int("--num", args.num)
    check_seed("--seed", args.seed)
    if "pipelined" in samplers:
        check(1 <= args.streams <= cfg.K, "--streams", args.streams,
              f"must be in [1, K={cfg.K}] (one stage per group of steps)")
    check_number("--bias", args.bias, -1, 1)
    if args.label is None:
        label = torch.arange(args.num) % cfg.labels if cfg.labels else None
    elif args.label == "none":
        label = torch.full((args.num,), -1) if cfg.labels else None
    else:
        try:
            k = int(args.label)
        except ValueError:
            k = None
        if k is None or not 0 <= k < max(cfg.labels, 1) or not cfg.labels:
            allowed = f"0..{cfg.labels - 1} or 'none'" if cfg.labels else "'none' (unconditional)"
            raise CLIError(f"--label {args.label}: must be {allowed}")
        label = torch.full((args.num,), k)
    if args.mp4:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise CLIError("--mp4 needs the optional imageio-ffmpeg: pip install imageio-ffmpeg "
                           "(or use --gif / --npy)") from None
    return dict(samplers=samplers, context_t=context_t, frames=frames, label=label)


def check_world_size(world: int, K: int):
    """torchrun: one process per group of steps, checked before the processes meet."""
    if not 1 <= world <= K:
        raise CLIError(f"torchrun --nproc_per_node={world}: must be in [1, K={K}] (one process "
                       "per group of steps)")


def output_paths(args, rows: dict, ckpt: Path) -> dict:
    """{'--gif' / '--mp4' / a row: its file}, checked (sample.check_outputs) before any work:
    with two samplers --npy v.npy names v_block.npy and v_step.npy."""
    named = {}
    for flag, path in (("--gif", args.gif), ("--mp4", args.mp4)):
        if path:
            named[flag] = (f"{flag} {path}", path)
    if args.npy:
        base = Path(args.npy)
        if base.is_dir():
            raise CLIError(f"--npy {args.npy}: is a directory; give a file name")
        several = sum(s is not None for s in rows.values()) > 1
        for row, s in rows.items():
            if s is not None:
                p = base.with_name(f"{base.stem}_{s}{base.suffix}") if several else base
                named[row] = (f"--npy {args.npy}" + ("" if p == base else f" ({p.name})"), p)
    checked = check_outputs(dict(named.values()), {f"--ckpt {args.ckpt}": ckpt})
    return {key: checked[what] for key, (what, _) in named.items()}


def open_npy(path, shape) -> np.ndarray:
    """A uint8 .npy of `shape` to fill in place (memory-mapped), its disk space taken first: a
    disk too small is an OSError here, not a crash (SIGBUS) at a later frame."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return np.lib.format.open_memmap(path, mode="r+")


def main(argv=None):
    from tqdm import tqdm
    args = parse_args(argv)
    dev = pick_device(args.device)
    world, rank = int(os.environ.get("WORLD_SIZE", 0)), int(os.environ.get("RANK", 0))
    if world and args.sampler != "pipelined":
        raise CLIError("under torchrun, use --sampler pipelined (one stage per process)")
    model, meta = load_student(args.ckpt, "cpu")
    cfg = model.cfg
    c = check_args(args, cfg, meta)
    samplers, frames, label = c["samplers"], c["frames"], c["label"]
    if world:
        check_world_size(world, cfg.K)
    writer_rank = not world or rank == world - 1
    name = Path(args.ckpt).stem
    rows = {"data": None, **{f"{name}: {s}" + ("-major" if s in ("block", "step") else ""): s
                             for s in samplers}}
    # every output is checked before any work, and written under a temporary name: a bad path,
    # a full disk or Ctrl-C loses nothing
    outs = output_paths(args, rows, resolve_ckpt(args.ckpt)) if writer_rank else {}
    if world:
        import torch.distributed as dist
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            dev = torch.device("cuda", rank % torch.cuda.device_count())
    model = model.to(dev)
    measure = not args.no_metrics and frames >= 5 * cfg.block
    if not (measure or "--gif" in outs or "--mp4" in outs):
        del rows["data"]                               # the ground truth is only for showing
    noise = hiar.Noise(cfg, [args.seed * 1_000_003 + i for i in range(args.num)], dev)
    whole = -(-frames // cfg.block) * cfg.block        # whole blocks; the last one is cut
    streams = {row: data_stream(cfg, args.num, args.seed, whole, label) if s is None else
               block_stream(model, s, noise, whole, label, c["context_t"], args.streams,
                            args.bias, args.sink) for row, s in rows.items()}
    if not writer_rank:                                 # a middle stage of the torchrun pipeline
        with torch.no_grad():
            for _ in streams[list(rows)[-1]]:
                pass
        return
    meters = {row: DriftMeter(frames, cfg.block, cfg.shapes) for row in rows} if measure else {}
    t, kept = 0, "no output was written and no file changed"
    try:
        with contextlib.ExitStack() as stack:
            for stream in streams.values():             # a pipeline's stages stop at once
                stack.callback(stream.close)
            tmp = {key: stack.enter_context(atomic(p)) for key, p in outs.items()}
            npys = {row: open_npy(tmp[row], (args.num, frames, cfg.size, cfg.size, 3))
                    for row in rows if row in tmp}
            gif = stack.enter_context(GifWriter(tmp["--gif"])) if "--gif" in tmp else None
            mp4 = None
            if "--mp4" in tmp:
                import imageio.v2 as imageio
                mp4 = stack.enter_context(imageio.get_writer(tmp["--mp4"], format="FFMPEG",
                                                             fps=8, macro_block_size=1))
            bar = stack.enter_context(tqdm(total=frames, desc="frames", unit="frame",
                                           disable=None))
            stack.enter_context(torch.no_grad())
            for blocks in zip(*streams.values()):       # block n of every row, in step
                blocks = [x[:, :frames - t] for x in blocks]
                uint8 = {}
                for row, x in zip(rows, blocks):
                    if row in meters:
                        meters[row].update(x)
                    uint8[row] = to_uint8(x)
                    if row in npys:
                        npys[row][:, t:t + x.shape[1]] = uint8[row]
                if gif or mp4:
                    for fr in grid_frames(uint8, per_row=min(args.num, 4)):
                        if gif:
                            gif.append(fr)
                        if mp4:                         # H.264 (yuv420p) wants even sides
                            mp4.append_data(np.pad(fr, ((0, fr.shape[0] % 2),
                                                        (0, fr.shape[1] % 2), (0, 0))))
                t += blocks[0].shape[1]
                bar.update(blocks[0].shape[1])
            for arr in npys.values():
                arr.flush()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"at frame {t} of {frames}; {kept}") from None
    except OSError as e:                                # a full disk
        raise OSError(e.errno, f"{e.strerror} while writing "
                      f"{', '.join(map(str, outs.values()))}; {kept}") from None
    for p in outs.values():
        print(f"wrote {p}")
    if meters:
        print(metric_table({row: m.result() for row, m in meters.items()}))


if __name__ == "__main__":
    run_cli(main)
