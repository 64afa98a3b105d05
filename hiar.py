"""HiAR — hierarchical denoising for autoregressive video diffusion, in one readable file.

An autoregressive (AR) video diffusion model makes a video block by block; each block sees the
earlier blocks through a KV cache. Few-step samplers such as CausVid and Self-Forcing are
*block-major*: they finish block n, then cache its clean result as context for everything after
it, so a mistake becomes confident context and long videos drift. HiAR (Zou et al., arXiv
2603.08703) is *step-major*: for each denoising step it walks over all blocks and conditions each
block on its predecessors at the *same* noise level (the step's output level t_{j+1}), which
carries enough for continuity without propagating confident errors (paper Alg. 1, Eq. 9).

Map of this file, in reading order (section banners mirror it):
  1. Config            one dataclass, named presets, validation
  2. Toy data          moving Gaussian blobs with known physics
  3. Schedule          flow matching, σ-shift, the student's K-step σ list
  4. Model             a small video transformer: adaLN per frame, block-causal or full attention,
                       temporal RoPE, KV cache with a rolling window
  5. Sampler pieces    the noise bank, the context (KV cache or slow reference; fused pass), a cell
  6. Block-major       the CausVid / Self-Forcing sampler
  7. Step-major        the HiAR sampler (paper Alg. 1, context level of Eq. 9 / Table 2)
  8. Pipelined         the step-major wavefront on S threads or S processes
  9. Losses            flow matching, teacher ODE, DMD (reverse KL), forward KL (Eq. 10-11)

Time convention, used everywhere: σ ∈ [0, 1], x_σ = (1 − σ)·x0 + σ·ε;
σ = 1 is pure noise, σ = 0 is clean data. The network predicts the velocity
v = ε − x0, so x0_hat = x_σ − σ·v_hat.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ================================================================================================
# 1. Config
# ================================================================================================

CONTEXT_LEVELS = ("current", "next", "clean")  # paper Table 2: t_c = t_j, t_{j+1}, 0


@dataclass
class Config:
    # toy data: `shapes` Gaussian blobs of a palette colour on black, bouncing in a size×size box
    size: int = 16            # frame height = width, pixels
    frames: int = 12          # training length T (frames); the student's attention window default
    block: int = 3            # frames per AR block (paper: 3 latent frames)
    shapes: int = 2           # blobs per video
    blob_sigma: tuple = (1.3, 1.8)   # blob radius range (Gaussian std, pixels)
    speed: tuple = (0.4, 0.9)        # speed range (pixels per frame)
    # model
    patch: int = 4            # patch side; tokens per frame = (size / patch)^2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    # schedule / sampling
    K: int = 4                # student denoising steps (paper: 4)
    shift: float = 5.0        # σ-shift of the student's step list (paper: 5)
    window: int = 0           # rolling attention window, frames incl. the current block (0: frames)
    context_t: str = "next"   # context level of the step-major sampler: current | next | clean
    # training budget (used by train_toy.py; kept here so a checkpoint carries its whole recipe)
    batch: int = 32
    teacher_steps: int = 6000
    teacher_lr: float = 1e-3
    ode_pairs: int = 512
    ode_steps: int = 48       # teacher Euler steps for ODE pairs (official: 48, shift 8)
    ode_shift: float = 8.0
    init_steps: int = 1500
    init_lr: float = 3e-4
    dmd_steps: int = 400
    dmd_batch: int = 8
    gen_lr: float = 2e-5
    critic_lr: float = 4e-5
    critic_ratio: int = 3     # critic updates per generator update (paper: 5)
    fkl_weight: float = 0.1   # λ of Eq. 11 (paper: 0.1); 0 turns the forward-KL term off
    fkl_mode: str = "bidirectional"  # student attention in the FKL term: bidirectional | causal
    ema: float = 0.99
    ema_start: int = 100
    sample_frames: int = 96   # long-rollout length for GIFs and metrics (8× the training length)
    ckpt_every: int = 100     # training steps between checkpoints (DMD: a fifth of it)

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} is invalid: {allowed}")
        for name in ("size", "frames", "block", "shapes", "patch", "dim", "depth", "heads", "K",
                     "batch", "dmd_batch", "critic_ratio", "sample_frames", "ckpt_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "must be an integer >= 1")
        need(self.frames % self.block == 0, "frames", f"must be a multiple of block={self.block}")
        need(self.size % self.patch == 0, "patch", f"must divide size={self.size}")
        need(self.dim % self.heads == 0 and (self.dim // self.heads) % 2 == 0, "heads",
             f"must divide dim={self.dim} into an even head size (RoPE rotates pairs)")
        need(self.window >= 0 and self.window % self.block == 0, "window",
             f"must be 0 (= frames) or a positive multiple of block={self.block}")
        need(self.context_t in CONTEXT_LEVELS, "context_t", f"must be one of {CONTEXT_LEVELS}")
        need(self.fkl_mode in ("bidirectional", "causal"), "fkl_mode",
             "must be 'bidirectional' or 'causal'")
        need(self.shift > 0, "shift", "must be > 0")
        need(self.ode_shift > 0, "ode_shift", "must be > 0")
        need(self.fkl_weight >= 0, "fkl_weight", "must be >= 0")
        need(0 <= self.ema < 1, "ema", "must be in [0, 1)")
        for name in ("blob_sigma", "speed"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi, name, "must be a (low, high) pair with 0 < low <= high")
        need(self.blob_sigma[1] * 2 < self.size, "blob_sigma", f"must be < size/2={self.size / 2}")
        self.blob_sigma, self.speed = tuple(self.blob_sigma), tuple(self.speed)

    @property
    def window_frames(self) -> int:
        return self.window or self.frames

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Config fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # tiny, for tests: a forward pass in milliseconds, every training stage in seconds
    "smoke": dict(size=8, frames=6, block=2, patch=4, dim=32, depth=2, heads=2, K=2, batch=4,
                  blob_sigma=(1.0, 1.5), teacher_steps=30, ode_pairs=8, ode_steps=6, init_steps=10,
                  dmd_steps=4, dmd_batch=2, critic_ratio=2, ema_start=2, sample_frames=12,
                  ckpt_every=5),
    # the default of train_toy.py: 16×16 RGB, 12 frames = 4 blocks of 3, ~1.2M parameters
    "toy": dict(),
}

# ================================================================================================
# 2. Toy data: moving shapes with known physics
# ================================================================================================

# Saturated palette (RGB in [0, 1]); the background is black. Metrics compare against these.
PALETTE = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.4, 1.0], [1.0, 0.9, 0.1]])


def _bounce(p0, v, t, lo, hi):
    """Position and velocity of a point moving at constant speed between walls lo and hi,
    reflecting elastically: unfold the path (p0 + v·t), then fold it with a triangle wave."""
    L = hi - lo
    u = torch.remainder(p0 - lo + v * t, 2 * L)               # position on the unfolded circuit
    forward = u < L
    pos = lo + torch.where(forward, u, 2 * L - u)
    vel = torch.where(forward, v, -v)
    return pos, vel


def moving_shapes(cfg: Config, batch: int, generator: torch.Generator | None = None,
                  frames: int | None = None):
    """Draw `batch` videos of Gaussian blobs bouncing off the walls.

    Returns (video, state): video (B, T, 3, H, W) in [-1, 1]; state holds the true physics:
    pos, vel (B, T, S, 2) as (x, y) in pixels, radius (B, S), colour_id (B, S), colour (B, S, 3).
    """
    T = cfg.frames if frames is None else frames
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"frames={T!r} is invalid: must be an integer >= 1")
    B, S, H = batch, cfg.shapes, cfg.size
    g = generator
    r_lo, r_hi = cfg.blob_sigma
    radius = r_lo + (r_hi - r_lo) * torch.rand(B, S, generator=g)                  # (B, S)
    lo, hi = radius[..., None], H - 1 - radius[..., None]       # walls keep the core inside
    p0 = lo + (hi - lo) * torch.rand(B, S, 2, generator=g)     # (B, S, 2)
    speed = cfg.speed[0] + (cfg.speed[1] - cfg.speed[0]) * torch.rand(B, S, 1, generator=g)
    angle = 2 * math.pi * torch.rand(B, S, 1, generator=g)
    v0 = speed * torch.cat([angle.cos(), angle.sin()], -1)     # (B, S, 2)
    colour_id = torch.stack([torch.randperm(len(PALETTE), generator=g)[:S] for _ in range(B)])
    colour = PALETTE[colour_id]                                 # (B, S, 3)
    t = torch.arange(T, dtype=torch.float32)[None, :, None, None]     # (1, T, 1, 1)
    pos, vel = _bounce(p0[:, None], v0[:, None], t, lo[:, None], hi[:, None])  # (B, T, S, 2)
    grid = torch.arange(H, dtype=torch.float32)
    dx = grid[None, None, None, None, :] - pos[..., 0, None, None]   # (B, T, S, 1, W)
    dy = grid[None, None, None, :, None] - pos[..., 1, None, None]   # (B, T, S, H, 1)
    r2 = 2 * radius[:, None, :, None, None] ** 2
    blob = torch.exp(-(dx ** 2 + dy ** 2) / r2)                      # (B, T, S, H, W)
    img = torch.einsum("btshw,bsc->btchw", blob, colour).clamp(0, 1)  # (B, T, 3, H, W)
    state = dict(pos=pos, vel=vel, radius=radius, colour_id=colour_id, colour=colour)
    return img * 2 - 1, state


# ================================================================================================
# 3. Schedule: flow matching with a σ-shift
# ================================================================================================

def shift_sigma(s, shift: float):
    """Timestep shift (Wan / SD3): σ = shift·s / (1 + (shift − 1)·s), s ∈ [0, 1]."""
    return shift * s / (1 + (shift - 1) * s)


def student_sigmas(K: int, shift: float) -> list[float]:
    """The student's levels σ_0 > ... > σ_{K-1}, plus σ_K = 0 (the output). For K = 4, shift 5
    this is t ∈ [1000, 750, 500, 250] warped: σ ≈ [1.0, 0.9375, 0.833, 0.625], then 0."""
    return [float(shift_sigma(1 - j / K, shift)) for j in range(K)] + [0.0]


def add_noise(x0, eps, sigma):
    """x_σ = (1 − σ)·x0 + σ·ε; `sigma`: a float or broadcastable, e.g. (B, T, 1, 1, 1)."""
    return (1 - sigma) * x0 + sigma * eps


def x0_from_v(x_t, v, sigma):
    """x0_hat = x_σ − σ·v_hat (since v = ε − x0)."""
    return x_t - sigma * v


def frame_sigma(sigma, B: int, T: int, device=None) -> torch.Tensor:
    """A per-frame σ tensor (B, T) from a float, a (B,) tensor or a (B, T) tensor."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if s.dim() == 0:
        s = s.expand(B)
    if s.dim() == 1:
        s = s[:, None].expand(B, T)
    return s


# ================================================================================================
# 4. Model: a small video transformer with per-frame timesteps, block-causal attention, KV cache
# ================================================================================================

def attention_mask(q_frames, k_frames, block: int, window: int, causal: bool):
    """Which key frames each query frame may attend to, (Lq, Lk) bool from absolute frame indices.

    Block-causal (student): a query in block m sees keys in blocks <= m, and (rolling window)
    only keys at most `window − block` frames before the start of its own block, so a block never
    sees more than `window` frames in all (its own included). Full (teacher): None = everything.
    """
    if not causal:
        return None
    q_start = (q_frames // block * block)[:, None]
    k = k_frames[None, :]
    return (k < q_start + block) & (k >= q_start - (window - block))


def rope(x, frame, base: float = 100.0):
    """Rotary position embedding over the frame index (temporal RoPE), x (B, h, L, d), frame (L,).

    Attention scores then depend only on frame *differences*. With the rolling window, the student
    never attends across more than `window` frames, so a video of any length only ever shows it
    offsets it saw in training; that is what lets it run past the training length. (Spatial
    position comes from a learned per-patch embedding, which is the same in every frame.)
    """
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = frame.to(torch.float32)[:, None] * freq[None]                                # (L, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class KVCache:
    """Keys and values of the context frames for every layer, holding at most `max_frames` frames
    (the rolling window evicts the oldest). Keys are stored already rotated by their RoPE angle."""

    def __init__(self, depth: int, max_frames: int, tokens_per_frame: int):
        self.k = [None] * depth            # per layer (B, h, L, d)
        self.v = [None] * depth
        self.frame = None                  # (L,) absolute frame index of each cached token
        self.max_tokens = max_frames * tokens_per_frame

    def __len__(self):
        return 0 if self.frame is None else len(self.frame)

    def append(self, layer: int, k, v, frame):
        """Append one layer's keys/values (B, h, L, d) for frames `frame` (L,); keep the newest."""
        def newest(old, new, dim=-2):                  # concatenate, keep the last max_tokens
            t = new if old is None else torch.cat([old, new], dim)
            keep = min(t.shape[dim], self.max_tokens)
            return t.narrow(dim, t.shape[dim] - keep, keep)
        self.k[layer] = newest(self.k[layer], k.detach())   # context never carries gradient
        self.v[layer] = newest(self.v[layer], v.detach())
        # The frame index is shared by all layers: update it after the last one, so that every
        # layer of one forward pass sees the cache as it was before that pass.
        if layer == len(self.k) - 1:
            self.frame = newest(self.frame, frame, 0)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation from the per-frame timestep."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, frame, mask, cache: KVCache | None, layer: int, write: int):
        # x: (B, L, D) tokens, c: (B, L, D) conditioning, frame: (L,) absolute frame per token,
        # mask: (L, cached + L) which keys each query may see (None: all)
        B, L, D = x.shape
        sa, ga, ma, sm, gm, mm = self.ada(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), sa, ga)).view(B, L, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # (B, h, L, d)
        q, k = rope(q, frame), rope(k, frame)
        k_all, v_all = k, v
        if cache is not None and len(cache):                              # context first
            k_all = torch.cat([cache.k[layer], k], dim=-2)
            v_all = torch.cat([cache.v[layer], v], dim=-2)
        if cache is not None and write:                                   # first `write` tokens
            cache.append(layer, k[:, :, :write], v[:, :, :write], frame[:write])
        att = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        x = x + ma * self.proj(att.transpose(1, 2).reshape(B, L, D))
        x = x + mm * self.mlp(modulate(self.norm2(x), sm, gm))
        return x


def timestep_embedding(sigma, dim: int):
    """Sinusoidal embedding of 1000·σ, (…,) → (…, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device) / half)
    ang = 1000 * sigma[..., None].float() * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class VideoDiT(nn.Module):
    """Video transformer v_θ(x_σ, σ) → v_hat. One module for teacher and student: `causal=True`
    gives the student's block-causal attention, `causal=False` the teacher's full attention.

    Every frame carries its own σ (adaLN per frame), so one sequence may mix noise levels — the
    fused pass and the step-major context rely on this.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch, cfg.dim
        self.patch_in = nn.Linear(3 * p * p, D)
        self.pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, D) * 0.02)  # spatial only
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.heads) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(D, 2 * D)
        self.patch_out = nn.Linear(D, 3 * p * p)
        for m in (self.ada_out, self.patch_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.calls = 0          # forward passes so far (tests count them against the analysis)

    def new_cache(self, window: int | None = None) -> KVCache:
        """An empty KV cache holding the `window − block` context frames a block may see."""
        w = window or self.cfg.window_frames
        return KVCache(self.cfg.depth, w - self.cfg.block, self.cfg.tokens_per_frame)

    def forward(self, x, sigma, frame0: int = 0, causal: bool = True, cache: KVCache | None = None,
                write_frames: int = 0, window: int | None = None):
        """x (B, T, 3, H, W) at per-frame levels sigma (B, T) (or a float / (B,)); frame0 is the
        absolute index of x's first frame. With a cache, x attends to the cached frames too, and
        the keys/values of its first `write_frames` frames are appended to the cache.
        Returns v_hat (B, T, 3, H, W)."""
        self.calls += 1
        cfg, p = self.cfg, self.cfg.patch
        B, T, C, H, W = x.shape
        if (C, H, W) != (3, cfg.size, cfg.size):
            raise ValueError(f"x has frame shape {(C, H, W)}; the model expects "
                             f"{(3, cfg.size, cfg.size)}")
        P = cfg.tokens_per_frame
        tok = x.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        tok = tok.reshape(B, T * P, C * p * p)                                   # (B, L, C·p·p)
        h = self.patch_in(tok) + self.pos.repeat(T, 1)                          # (B, L, D)
        s = frame_sigma(sigma, B, T, x.device)                                   # (B, T)
        c = self.t_mlp(timestep_embedding(s, cfg.dim)).repeat_interleave(P, 1)  # (B, L, D)
        frame = torch.arange(frame0, frame0 + T, device=x.device).repeat_interleave(P)  # (L,)
        k_frame = torch.cat([cache.frame, frame]) if cache is not None and len(cache) else frame
        mask = attention_mask(frame, k_frame, cfg.block, window or cfg.window_frames, causal)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, frame, mask, cache, i, write_frames * P)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        out = self.patch_out(modulate(self.norm_out(h), shift, scale))         # (B, L, C·p·p)
        out = out.reshape(B, T, H // p, W // p, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, T, C, H, W)

    def x0(self, x, sigma, **kw):
        """x0_hat from one forward pass."""
        s = frame_sigma(sigma, x.shape[0], x.shape[1], x.device)[..., None, None, None]
        return x0_from_v(x, self(x, sigma, **kw), s)


# ================================================================================================
# 5. Sampler pieces: noise bank, context, cell
# ================================================================================================
# Both orders run the same cells. Cell (n, j) denoises block n from σ_j: x0_hat = x - σ_j v_hat,
# then re-noises x0_hat to σ_{j+1} with fresh noise (SDE-style few-step sampling, as Self-Forcing).
# All randomness comes from one noise bank ε[j, n] (K, N, B, b, 3, H, W): ε[0, n] is block n's
# starting noise, ε[j, n] (j >= 1) re-noises it to σ_j. So every order (and the pipeline) uses
# identical randomness and can be compared on the same draw.

def noise_bank(cfg: Config, batch: int, frames: int, generator=None, device=None, K=None):
    """ε[j, n] for K steps and N = frames / block blocks: (K, N, B, b, 3, H, W)."""
    if not isinstance(frames, int) or frames < 1 or frames % cfg.block:
        raise ValueError(f"frames={frames!r} is invalid: must be a positive multiple of "
                         f"block={cfg.block}")
    K = K or cfg.K
    shape = (K, frames // cfg.block, batch, cfg.block, 3, cfg.size, cfg.size)
    return torch.randn(shape, generator=generator).to(device)


class Context:
    """What a block sees of its predecessors. Fast path: a KV cache with a rolling window.
    Slow reference (`use_cache=False`): keep every written block and re-run the whole sequence
    (all written blocks + the current one) through the masked model at each query. The two agree
    because the mask gives each frame exactly the window it had when its keys were cached.

    `fused=True` (the paper's fused pass): a write is held back and done in the same forward pass
    as the next block's denoising — one pass over both blocks with per-frame levels — so a step
    costs N passes instead of 2N (a write that no later block reads is never made)."""

    def __init__(self, model: VideoDiT, use_cache: bool = True, window: int | None = None,
                 fused: bool = False):
        self.model, self.window, self.b = model, window, model.cfg.block
        self.cache = model.new_cache(window) if use_cache else None
        self.fused, self.pending = fused and use_cache, None     # pending: (x, σ, n) to write
        self.xs, self.sigmas = [], []                   # reference path: written blocks, levels

    def denoise(self, x, sigma, n: int):
        """v_hat for block n (B, b, 3, H, W) at level sigma given the context."""
        B, b = x.shape[0], self.b
        if self.pending is not None:                    # fused: write block n − 1, denoise n
            xc, sc, m = self.pending
            self.pending = None
            if m != n - 1:
                raise ValueError(f"fused pass: pending block {m} is not block {n} - 1")
            xs = torch.cat([xc, x], 1)                                          # (B, 2b, …)
            s = torch.cat([frame_sigma(sc, B, b, x.device), frame_sigma(sigma, B, b, x.device)], 1)
            return self.model(xs, s, frame0=m * b, cache=self.cache, write_frames=b,
                              window=self.window)[:, b:]
        if self.cache is not None:
            return self.model(x, sigma, frame0=n * b, cache=self.cache, window=self.window)
        xs = torch.cat(self.xs + [x], 1)                                 # (B, up to (n+1)b, ...)
        s = torch.cat(self.sigmas + [frame_sigma(sigma, B, b, x.device)], 1)
        return self.model(xs, s, frame0=(n + 1) * b - xs.shape[1], window=self.window)[:, -b:]

    @torch.no_grad()
    def write(self, x, sigma, n: int):
        """Make block n, at level sigma, context for the blocks after it (a detached pass)."""
        if self.fused:
            self.pending = (x.detach(), sigma, n)
        elif self.cache is not None:
            self.model(x, sigma, frame0=n * self.b, cache=self.cache, write_frames=self.b,
                       window=self.window)
        else:
            self.xs.append(x)
            self.sigmas.append(frame_sigma(sigma, x.shape[0], self.b, x.device))


def cell(ctx: Context, x, n: int, j: int, sigmas, noise, grad: bool = False):
    """Cell (n, j): denoise block n from σ_j. Returns (x0_hat, x at σ_{j+1}); at the last step
    (σ_{j+1} = 0) the second is x0_hat itself. Gradient flows only if `grad` (the exit step)."""
    with torch.set_grad_enabled(grad):
        x0_hat = x0_from_v(x, ctx.denoise(x, sigmas[j], n), sigmas[j])
    if j + 1 < len(noise):
        return x0_hat, add_noise(x0_hat, noise[j + 1, n], sigmas[j + 1])
    return x0_hat, x0_hat


def _check_sampler_args(model, noise, context_t, exit_step):
    if noise.dim() != 7 or noise.shape[3:] != (model.cfg.block, 3, model.cfg.size,
                                               model.cfg.size):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (K, N, B, "
                         f"{model.cfg.block}, 3, {model.cfg.size}, {model.cfg.size}) "
                         "from noise_bank()")
    if context_t not in CONTEXT_LEVELS:
        raise ValueError(f"context_t={context_t!r} is invalid: must be one of {CONTEXT_LEVELS}")
    K = noise.shape[0]
    if exit_step is not None and not 0 <= exit_step < K:
        raise ValueError(f"exit_step={exit_step!r} is invalid: must be in [0, {K - 1}]")
    return K, noise.shape[1], (K - 1 if exit_step is None else exit_step)


# ================================================================================================
# 6. Block-major sampler (CausVid / Self-Forcing)
# ================================================================================================

def sample_block_major(model: VideoDiT, noise, context_t: str = "clean", exit_step=None,
                       use_cache: bool = True, window: int | None = None, shift=None):
    """Block-major order: for n: for j: cell (n, j); then one extra pass writes the finished,
    clean block into the cache (K + 1 passes a block). `context_t` is accepted for a common
    signature; block-major context is always clean (that is the point of comparison).

    noise (K, N, B, b, 3, H, W) from noise_bank → video (B, N·b, 3, H, W) in [-1, 1] (x0_hat).
    Training (self-rollout distillation): `exit_step` j* stops every block at step j*; only that
    step's prediction carries gradient (if grad is enabled by the caller).
    """
    K, N, J = _check_sampler_args(model, noise, context_t, exit_step)
    sigmas = student_sigmas(K, model.cfg.shift if shift is None else shift)
    grad = torch.is_grad_enabled()
    ctx, out = Context(model, use_cache, window), []
    for n in range(N):
        x = noise[0, n]                                             # (B, b, 3, H, W) at σ_0 = 1
        for j in range(J + 1):
            x0_hat, x = cell(ctx, x, n, j, sigmas, noise, grad and j == J)
        ctx.write(x0_hat.detach(), 0.0, n)                          # clean context, t_c = 0
        out.append(x0_hat)
    return torch.cat(out, 1)


# ================================================================================================
# 7. Step-major sampler (HiAR, paper Alg. 1)
# ================================================================================================

def context_input(context_t: str, x_in, x0_hat, x_next, sigmas, j: int):
    """What block n contributes as context at step j (paper Eq. 9, Table 2): its input at t_j
    ('current'), its output re-noised to t_{j+1} — the next step's input — ('next', HiAR's
    choice; clean at the last step), or the clean x0_hat ('clean'). Returns (x_c, σ_c)."""
    if context_t == "current":
        return x_in, sigmas[j]
    if context_t == "next":
        return x_next, sigmas[j + 1]
    return x0_hat, 0.0


def sample_step_major(model: VideoDiT, noise, context_t: str = "next", exit_step=None,
                      use_cache: bool = True, window: int | None = None, shift=None,
                      fused: bool = False):
    """Step-major order (Alg. 1): for j: reset the cache; for n: cell (n, j), then write block n
    at the context level t_c (default t_{j+1}) for the blocks after it. 2K passes a block.

    `fused=True` merges the write of block n and the denoising of block n + 1 into one pass
    over both blocks with per-frame levels (the paper's fused pass): N passes a step.
    Same signature, noise bank and output as `sample_block_major`.
    """
    K, N, J = _check_sampler_args(model, noise, context_t, exit_step)
    sigmas = student_sigmas(K, model.cfg.shift if shift is None else shift)
    grad = torch.is_grad_enabled()
    x = [noise[0, n] for n in range(N)]                             # all blocks start at σ_0 = 1
    out = [None] * N
    for j in range(J + 1):                                          # Alg. 1, outer loop: steps
        ctx = Context(model, use_cache, window, fused)              # the cache is reset per step
        for n in range(N):                                          # inner loop: blocks
            out[n], x[n] = step_major_cell(ctx, x[n], n, j, sigmas, noise, context_t,
                                           grad and j == J)
    return torch.cat(out, 1)


def step_major_cell(ctx: Context, x, n: int, j: int, sigmas, noise, context_t: str,
                    grad: bool = False):
    """Cell (n, j) of Alg. 1: denoise block n at t_j, then write it into step j's cache at the
    context level t_c for the blocks after it. Returns (x0_hat, x at σ_{j+1})."""
    x0_hat, x_next = cell(ctx, x, n, j, sigmas, noise, grad)
    ctx.write(*context_input(context_t, x, x0_hat.detach(), x_next.detach(), sigmas, j), n)
    return x0_hat, x_next


# ================================================================================================
# 8. Pipelined step-major sampler: the wavefront
# ================================================================================================
# Cell (n, j) needs only (n − 1, j) (its context, through step j's cache) and (n, j − 1) (its
# input). So the cells of one anti-diagonal n + j are independent, and the steps can run as a
# pipeline: stream s owns a contiguous group of steps with one KV cache per step, takes block n
# from stream s − 1, runs its steps on it, and hands it on. With S streams the N blocks finish in
# N + S − 1 slots instead of N·S: ideal speed-up N·S / (N + S − 1).

def step_groups(K: int, S: int) -> list[range]:
    """Split steps 0..K−1 into S contiguous groups, as even as possible."""
    if not isinstance(S, int) or not 1 <= S <= K:
        raise ValueError(f"streams={S!r} is invalid: must be an integer in [1, K={K}]")
    edges = [round(s * K / S) for s in range(S + 1)]
    return [range(edges[s], edges[s + 1]) for s in range(S)]


def pipeline_schedule(N: int, K: int, S: int) -> list[dict]:
    """Which cells run on which stream in which time slot, if every stage takes one slot:
    stream s runs block n (its steps) in slot n + s. Returns dicts (slot, stream, block, steps)."""
    return [dict(slot=n + s, stream=s, block=n, steps=list(g))
            for s, g in enumerate(step_groups(K, S)) for n in range(N)]


def run_stage(model: VideoDiT, noise, steps: range, context_t: str, receive, send,
              window: int | None = None, shift=None, fused: bool = False):
    """One pipeline stage: for each block in order, take its input at σ_{steps[0]} from
    `receive(n)`, run this stage's steps on it (one KV cache per step), and `send(n, x)` the result
    (at σ_{steps[-1] + 1}; clean from the last stage). Threads and processes both use it."""
    K, N = noise.shape[:2]
    sigmas = student_sigmas(K, model.cfg.shift if shift is None else shift)
    ctxs = {j: Context(model, True, window, fused) for j in steps}
    for n in range(N):
        x = receive(n)
        for j in steps:
            x = step_major_cell(ctxs[j], x, n, j, sigmas, noise, context_t)[1]
        send(n, x)


@torch.no_grad()
def sample_pipelined(model: VideoDiT, noise, context_t: str = "next", streams: int = 2,
                     window: int | None = None, shift=None, threads_per_stream: int | None = 1,
                     fused: bool = False):
    """Step-major sampling as a wavefront on `streams` threads, one stage each. Same signature,
    noise bank and video as `sample_step_major`: every forward pass sees the same inputs and the
    same cache, so on the CPU the video is bitwise equal to `sample_step_major` run with the same
    number of intra-op threads (`threads_per_stream`; None keeps the caller's). On a GPU each
    thread issues its kernels on a CUDA stream of its own."""
    K, N, _ = _check_sampler_args(model, noise, context_t, None)
    groups = step_groups(K, streams)
    # inbox[s][n]: block n's input to stage s; a stage waits until the stage before has sent it
    inbox = [[None] * N for _ in range(streams + 1)]
    ready = [[threading.Event() for _ in range(N)] for _ in range(streams + 1)]
    inbox[0] = [noise[0, n] for n in range(N)]
    for ev in ready[0]:
        ev.set()
    errors, caller_threads = [], torch.get_num_threads()
    cuda = noise.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(noise.device)               # the noise bank is ready for all

    def worker(s):
        def receive(n):
            ready[s][n].wait()
            if errors:
                raise RuntimeError("an earlier stage failed")
            return inbox[s][n]

        def send(n, x):
            if cuda:
                torch.cuda.current_stream().synchronize()   # x is ready before the next stage
            inbox[s + 1][n] = x
            ready[s + 1][n].set()
        try:
            if threads_per_stream:
                torch.set_num_threads(threads_per_stream)
            own_stream = (torch.cuda.stream(torch.cuda.Stream(noise.device)) if cuda
                          else contextlib.nullcontext())
            with torch.no_grad(), own_stream:
                run_stage(model, noise, groups[s], context_t, receive, send, window, shift, fused)
        except BaseException as e:                     # surface a worker's failure to the caller
            errors.append(e)
            for ev in ready[s + 1]:
                ev.set()

    pool = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(streams)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.set_num_threads(caller_threads)
    if errors:
        raise errors[0]
    return torch.cat(inbox[streams], 1)


@torch.no_grad()
def sample_distributed(model: VideoDiT, noise, context_t: str = "next", window=None, shift=None,
                       fused: bool = False):
    """The same wavefront across processes: rank s of S (torch.distributed, started with
    `torchrun --nproc_per_node=S`) runs stage s and passes each block's latent to rank s + 1 —
    the path for a model that outgrows one device. Every rank builds the same noise bank; the
    video is returned on every rank."""
    import torch.distributed as dist
    S, s = dist.get_world_size(), dist.get_rank()
    K, N, _ = _check_sampler_args(model, noise, context_t, None)
    out = []

    def receive(n):
        if s == 0:
            return noise[0, n]
        x = torch.empty_like(noise[0, n])
        dist.recv(x, src=s - 1)
        return x

    def send(n, x):
        if s + 1 < S:
            dist.send(x.contiguous(), dst=s + 1)
        else:
            out.append(x)

    run_stage(model, noise, step_groups(K, S)[s], context_t, receive, send, window, shift, fused)
    B, b = noise.shape[2], noise.shape[3]
    video = torch.cat(out, 1) if out else noise.new_empty((B, N * b) + tuple(noise.shape[4:]))
    dist.broadcast(video, src=S - 1)
    return video


# ================================================================================================
# 9. Losses
# ================================================================================================

def sample_train_sigma(B: int, generator=None, device=None):
    """σ for flow-matching training: logit-normal(0, 1), as in SD3 (B,)."""
    return torch.sigmoid(torch.randn(B, generator=generator, device=device))


def flow_loss(model, x0, sigma, eps, causal: bool = False):
    """Flow matching (rectified flow): L = ‖v_θ(x_σ, σ) − (ε − x0)‖², x_σ as above.
    Trains the teacher (full attention) and the DMD critic (the fake score). sigma: (B,)."""
    x_t = add_noise(x0, eps, sigma[:, None, None, None, None])
    return F.mse_loss(model(x_t, sigma, causal=causal), eps - x0)


@torch.no_grad()
def teacher_ode(teacher: VideoDiT, eps, keep: list[float], steps: int = 48, shift: float = 8.0):
    """Integrate the teacher's probability-flow ODE dx/dσ = v from σ = 1 to 0 with Euler steps on
    a shift-warped grid (official ODE pairs: 48 steps, shift 8) that also contains the levels
    `keep` (the student's σ_j). eps (B, T, 3, H, W) → (states at `keep` (B, len(keep), T, …) or
    None if `keep` is empty, x0)."""
    grid = [float(shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]
    grid = sorted({round(s, 7) for s in grid + list(keep)}, reverse=True)
    want = {round(s, 7): i for i, s in enumerate(keep)}
    x, states = eps, [None] * len(keep)
    for a, b in zip(grid[:-1], grid[1:]):
        if a in want:
            states[want[a]] = x
        x = x + (b - a) * teacher(x, a, causal=False)
    return (torch.stack(states, 1) if states else None), x


def dmd_loss(x0, teacher: VideoDiT, critic: VideoDiT, shift: float = 5.0, generator=None):
    """Distribution matching distillation: the paper's reverse-KL term (after DMD2 and
    Self-Forcing). Diffuse the student's video to a random level,
        x_σ = (1 − σ)·x0 + σ·ε,   t ~ U[0.02, 0.98],  σ = shift(t),
    read the clean-video predictions of the real score (frozen teacher) and the fake score
    (critic), and step x0 along their difference, normalised per video:
        grad = (x0_fake − x0_real) / mean|x0 − x0_real|,
        L = ½ · ‖x0 − sg(x0 − grad)‖².
    So ∂L/∂x0 ∝ grad: x0 moves to where the teacher's distribution is denser than the
    student's.
    x0 (B, T, 3, H, W) carries the generator's gradient; both score models are bidirectional."""
    B = x0.shape[0]
    with torch.no_grad():
        t = 0.02 + 0.96 * torch.rand(B, generator=generator).to(x0.device)
        sigma = shift_sigma(t, shift)                                     # (B,)
        x_t = add_noise(x0, torch.randn_like(x0), sigma[:, None, None, None, None])
        x0_real = teacher.x0(x_t, sigma, causal=False)
        x0_fake = critic.x0(x_t, sigma, causal=False)
        norm = (x0 - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def chord_x0(x_a, x_b, sigma_a: float, sigma_b: float):
    """The x0 that carries x_a (at σ_a) to x_b (at σ_b) along a straight line: extrapolate the
    chord of the teacher's trajectory to σ = 0:
        x0 = x_a − σ_a · (x_a − x_b) / (σ_a − σ_b)."""
    return x_a - sigma_a * (x_a - x_b) / (sigma_a - sigma_b)


def fkl_loss(student: VideoDiT, x_start, x0_target, sigma0: float = 1.0,
             bidirectional: bool = True):
    """Forward-KL regulariser (paper Eq. 10-11): regress the student's *first* denoising step
    (σ_0, pure noise) onto the teacher's ODE trajectory:
        L_FKL = ‖x0_θ(x_{σ_0}) − x0_ODE‖².
    The total generator loss is L = L_DMD + λ·L_FKL (λ = 0.1). The paper runs the student with
    bidirectional attention here; the official code keeps the block-causal mask (`False`).
    x_start, x0_target (B, T, 3, H, W)."""
    return F.mse_loss(student.x0(x_start, sigma0, causal=not bidirectional), x0_target)
