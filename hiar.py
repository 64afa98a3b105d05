"""HiAR — hierarchical denoising for autoregressive video diffusion, in one readable file.

An autoregressive (AR) video diffusion model makes a video block by block, each block seeing the
earlier ones through a KV cache. Few-step samplers such as CausVid and Self-Forcing are
*block-major*: they finish block n and cache its clean result as context for all later blocks, so
a mistake becomes confident context and long videos drift. HiAR (Zou et al., arXiv 2603.08703) is
*step-major*: each denoising step walks over all blocks, conditioning each on its predecessors at
the *same* noise level t_{j+1} — enough for continuity, without confident errors (Alg. 1, Eq. 9).

Map, in reading order (section banners mirror it): 1. Config; 2. Toy data, moving blobs whose
look is drawn per clip; 3. Schedule, flow matching with a σ-shift; 4. Model, a video transformer
with adaLN per frame, block-causal attention, temporal RoPE, a KV cache; 5. Sampler pieces;
6. Block-major, the CausVid / Self-Forcing sampler; 7. Step-major, HiAR's (Alg. 1), streamed;
8. Wavefront: threads or a batch; 9. Losses: flow matching (teacher forcing), teacher ODE, DMD, FKL.

Time convention: σ ∈ [0, 1], x_σ = (1 − σ)·x0 + σ·ε; σ = 1 is noise, σ = 0 data.
The network predicts the velocity v = ε − x0, so x0_hat = x_σ − σ·v_hat.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== 1. Config ===================================================================================

CONTEXT_LEVELS = ("current", "next", "clean")  # paper Table 2: t_c = t_j, t_{j+1}, 0
SAMPLER_FIELDS = ("K", "shift", "window", "context_t")  # may differ between teacher and student


@dataclass
class Config:
    """Data, network, sampler (training: train_toy.TrainConfig); user input: sample.make_config"""
    # toy data: `shapes` Gaussian blobs on a tinted background, bouncing in a size×size box;
    # every appearance attribute is drawn per clip from a (low, high) range (see moving_shapes)
    size: int = 16            # frame height = width, pixels
    frames: int = 12          # training length T (frames); the student's attention window default
    block: int = 3            # frames per AR block (paper: 3 latent frames)
    shapes: int = 2           # blobs per video
    blob_sigma: tuple = (1.2, 2.0)   # blob radius (Gaussian std, pixels)
    speed: tuple = (0.4, 0.9)        # pixels per frame
    saturation: tuple = (0.5, 1.0)   # blob HSV saturation
    value: tuple = (0.6, 1.0)        # blob HSV value (brightness)
    background: tuple = (0.0, 0.3)   # background level, drawn per RGB channel (a tint)
    labels: int = 4           # colour families, the clip's condition (0: unconditional toy)
    # model
    patch: int = 4            # patch side; tokens per frame = (size / patch)^2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    # sampler
    K: int = 4                # student denoising steps (paper: 4)
    shift: float = 1.0        # σ-shift of the student steps (paper 5; toy: docs/toy.md)
    window: int = 0           # rolling attention window, frames incl. the current block (0: frames)
    context_t: str = "next"   # context level of the step-major sampler: current | next | clean

    def __post_init__(self):
        for name in ("blob_sigma", "speed", "saturation", "value", "background"):
            setattr(self, name, tuple(float(x) for x in getattr(self, name)))  # JSON: lists
        assert self.frames % self.block == 0 and self.size % self.patch == 0
        assert self.window_frames % self.block == 0 and self.window_frames > self.block
        assert (self.dim // self.heads) % 2 == 0, "RoPE rotates pairs: even head size"

    @property
    def window_frames(self) -> int:
        return self.window or self.frames

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # tiny, for tests: a forward pass in milliseconds
    "smoke": dict(size=8, frames=6, block=2, patch=4, dim=32, depth=2, heads=2, K=2, labels=2,
                  blob_sigma=(1.0, 1.5)),
    # the default of train_toy.py: 16×16 RGB, 12 frames = 4 blocks of 3, ~1.3M parameters
    "toy": dict(),
}

# ==== 2. Toy data: moving shapes with known physics and per-clip appearance =======================
# Blob hue, saturation, brightness, size and the background tint are drawn per clip, so block n
# is right only if copied from the context (the toy's identity and style). The label (a prompt)
# fixes the colour family: blob hues lie within ±1/(2·labels) of turn label/labels.


def as_labels(label, B: int, labels: int) -> torch.Tensor:
    """None, an int or a (B,) integer tensor → (B,) long; -1 means 'no label'."""
    lab = torch.as_tensor(-1 if label is None else label).long()
    assert lab.dim() == 0 or lab.shape == (B,), f"label: an int or a ({B},) tensor"
    assert ((lab >= -1) & (lab < labels)).all(), f"label must be in [-1, {labels - 1}]"
    return lab.expand(B)


def hsv_to_rgb(h, s, v):
    """HSV (hue in turns, saturation, value in [0, 1]; any equal shapes) → RGB (…, 3)."""
    k = torch.stack([(5 + 6 * h) % 6, (3 + 6 * h) % 6, (1 + 6 * h) % 6], -1)    # (…, 3)
    return v[..., None] - (v * s)[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _bounce(p0, v, t, lo, hi):
    """Position, velocity at time t, bouncing between walls lo, hi: p0 + v·t folded back."""
    L = hi - lo
    u = torch.remainder(p0 - lo + v * t, 2 * L)               # position on the unfolded circuit
    return lo + torch.where(u < L, u, 2 * L - u), torch.where(u < L, v, -v)


def moving_shapes(cfg: Config, batch: int, generator: torch.Generator | None = None,
                  frames: int | None = None, label=None, start: int = 0):
    """`batch` clips (B, T, 3, H, W) in [-1, 1] and their truth per frame: pos, vel (B, T, S, 2);
    radius, hue, saturation, value (B, T, S); colour (B, T, S, 3), background (B, T, 3) in
    [0, 1]; label (B,). start = 0, T, 2T, … from one generator state: consecutive pieces."""
    T = cfg.frames if frames is None else frames
    assert T >= 1 and start >= 0, f"frames={T} must be >= 1 and start={start} >= 0"
    B, S, H, g = batch, cfg.shapes, cfg.size, generator

    def uniform(rng, *shape):
        return rng[0] + (rng[1] - rng[0]) * torch.rand(*shape, generator=g)

    drawn = torch.randint(max(cfg.labels, 1), (B,), generator=g)         # (B,)
    label = as_labels(label, B, cfg.labels)              # -1: no label asked, draw the family
    label = torch.where(label < 0, drawn, label) if cfg.labels else torch.full((B,), -1)
    offset = torch.rand(B, S, generator=g) - 0.5
    hue = (label[:, None] + offset) / cfg.labels % 1 if cfg.labels else offset + 0.5   # (B, S)
    sat, val = uniform(cfg.saturation, B, S), uniform(cfg.value, B, S)
    colour = hsv_to_rgb(hue, sat, val)                                            # (B, S, 3)
    background = uniform(cfg.background, B, 3)                                    # (B, 3)
    radius = uniform(cfg.blob_sigma, B, S)                                        # (B, S)
    lo, hi = radius[..., None], H - 1 - radius[..., None]      # walls keep the core inside
    p0 = lo + (hi - lo) * torch.rand(B, S, 2, generator=g)    # (B, S, 2)
    angle = 2 * math.pi * torch.rand(B, S, 1, generator=g)
    v0 = uniform(cfg.speed, B, S, 1) * torch.cat([angle.cos(), angle.sin()], -1)  # (B, S, 2)
    t = torch.arange(start, start + T, dtype=torch.float32)[None, :, None, None]  # (1, T, 1, 1)
    pos, vel = _bounce(p0[:, None], v0[:, None], t, lo[:, None], hi[:, None])   # (B, T, S, 2)
    grid = torch.arange(H, dtype=torch.float32)
    dx = grid[None, None, None, None, :] - pos[..., 0, None, None]   # (B, T, S, 1, W)
    dy = grid[None, None, None, :, None] - pos[..., 1, None, None]   # (B, T, S, H, 1)
    alpha = torch.exp(-(dx ** 2 + dy ** 2) / (2 * radius[:, None, :, None, None] ** 2))
    img = background[:, None, :, None, None] + torch.einsum(   # each blob paints over the
        "btshw,bsc->btchw", alpha, colour - background[:, None])  # ground by its profile
    per_frame = lambda a: a[:, None].expand(B, T, *a.shape[1:])     # noqa: E731
    state = dict(pos=pos, vel=vel, radius=per_frame(radius), hue=per_frame(hue),
                 saturation=per_frame(sat), value=per_frame(val), colour=per_frame(colour),
                 background=per_frame(background), label=label)
    return img.clamp(0, 1) * 2 - 1, state


# ==== 3. Schedule: flow matching with a σ-shift ==================================================

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


def frame_sigma(sigma, B: int, T: int, device=None) -> torch.Tensor:
    """A per-frame σ tensor (B, T) from a float, a (B,) tensor or a (B, T) tensor."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return s.expand(B, T) if s.dim() == 0 else s[:, None].expand(B, T) if s.dim() == 1 else s


# ==== 4. Model: a video transformer with per-frame σ, block-causal attention, KV cache =======

def rope(x, pos, base: float = 100.0):
    """Temporal RoPE at frame positions pos (L,), x (B, h, L, d): scores depend only on position
    *differences*, so a rolling window shows any length only offsets seen in training."""
    freq = base ** (-torch.arange(0, x.shape[-1], 2, device=x.device) / x.shape[-1])  # (d/2,)
    ang = pos[:, None] * freq[None]                                                    # (L, d/2)
    cos, sin, x1, x2 = ang.cos(), ang.sin(), x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class KVCache:
    """Keys (before RoPE), values per layer of the frames just before the next block, in order:
    the newest `max_frames` (a rolling window) after the first `sink` (StreamingLLM)."""

    def __init__(self, depth: int, max_frames: int, tokens_per_frame: int, sink: int = 0):
        self.k, self.v = [None] * depth, [None] * depth    # per layer (B, h, L, d)
        self.max_tokens, self.sink = max_frames * tokens_per_frame, sink * tokens_per_frame

    def __len__(self):                                     # tokens, once every layer has them
        return 0 if self.k[-1] is None else self.k[-1].shape[-2]

    def store(self, layer: int, k, v):
        """One layer's keys/values (B, h, L, d), context then new: keep the sink's, the newest."""
        s, new = self.sink, max(self.sink, k.shape[-2] - self.max_tokens + self.sink)
        self.k[layer] = torch.cat([k[..., :s, :], k[..., new:, :]], -2)
        self.v[layer] = torch.cat([v[..., :s, :], v[..., new:, :]], -2)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def per_clip(linear: nn.Linear, c, parts):
    """`linear` on the per-frame condition c (B, T, D), a product per video and part (a small one
    picks its kernel by its row count): a video's numbers do not depend on its batch or pass."""
    W = linear.weight.t().expand(len(c), -1, -1)                                  # (B, D, out)
    return torch.cat([torch.baddbmm(linear.bias, c[:, a:z], W) for a, z, *_ in parts], 1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation from the per-frame condition."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)         # zero at init: VideoDiT

    def forward(self, x, c, parts, cache: KVCache | None, layer: int):
        # x (B, T, P, D) tokens; c (B, T, D) the condition of each frame; parts: VideoDiT.forward
        B, T, P, D = x.shape
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = per_clip(
            self.adaLN_modulation, c, parts)[:, :, None].chunk(6, -1)   # (B, T, 1, D): a frame's
        qkv = self.qkv(modulate(self.norm1(x), shift_msa, scale_msa))            # (B, T, P, 3D)
        q, k, v = qkv.view(B, T * P, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        att = []
        for a, z, pos, mask, write in parts:               # frames a:z, first the ones written
            k_p, v_p = k[:, :, a * P:z * P], v[:, :, a * P:z * P]
            if cache is not None and cache.k[layer] is not None:        # context first
                k_p = torch.cat([cache.k[layer], k_p], -2)
                v_p = torch.cat([cache.v[layer], v_p], -2)
            if write:                      # (with their gradient only if written with it)
                cache.store(layer, k_p, v_p)
            q_p, k_p = rope(q[:, :, a * P:z * P], pos[(a - z) * P:]), rope(k_p, pos)
            att.append(F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask))
        x = x + gate_msa * self.proj(torch.cat(att, 2).transpose(1, 2).reshape(B, T, P, D))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def timestep_embedding(sigma, dim: int):
    """Sinusoidal embedding of 1000·σ, (…,) → (…, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=sigma.device) / (dim // 2))
    ang = 1000 * sigma[..., None].float() * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class VideoDiT(nn.Module):
    """v_θ(x_σ, σ, label) → v_hat for teacher (`causal=False`) and student (block-causal). Each
    frame has its own σ (adaLN per frame), so a sequence may mix levels. The label (a prompt) is
    added to the timestep embedding, as DiT's class; -1 / None is a learned 'no label' (CFG)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, p, D = cfg, cfg.patch, cfg.dim
        self.patch_in = nn.Linear(3 * p * p, D)
        self.pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, D) * 0.02)  # spatial only
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.label_emb = nn.Embedding(cfg.labels + 1, D)      # the last row: 'no label'
        nn.init.normal_(self.label_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.heads) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_out, self.patch_out = nn.Linear(D, 2 * D), nn.Linear(D, 3 * p * p)
        for w in [*self.adaLN_out.parameters(), *self.patch_out.parameters(),  # adaLN-zero (DiT)
                  *(w for blk in self.blocks for w in blk.adaLN_modulation.parameters())]:
            nn.init.zeros_(w)

    def new_cache(self, sink: bool = False) -> KVCache:
        """An empty KV cache for the `window − block` context frames (`sink`: block 0 stays)."""
        c = self.cfg
        return KVCache(c.depth, c.window_frames - c.block, c.tokens_per_frame, c.block * sink)

    def forward(self, x, sigma, label=None, frame0: int = 0, causal: bool = True,
                cache: KVCache | None = None, write_frames: int = 0):
        """x (B, T, 3, H, W) at levels sigma (B, T), (B,) or float, first frame frame0 → v_hat.
        With a cache x follows it: the first write_frames see it and are appended, the rest see it
        after (a fused pass: write, then denoise); RoPE counts from each part's first frame."""
        cfg, p, P = self.cfg, self.cfg.patch, self.cfg.tokens_per_frame
        B, T, C, H, W = x.shape
        assert (C, H, W) == (3, cfg.size, cfg.size), f"frame shape {(C, H, W)} is not the model's"
        tok = x.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        h = self.patch_in(tok.reshape(B, T, P, C * p * p)) + self.pos            # (B, T, P, D)
        n, w = (len(cache) // P, write_frames) if cache is not None else (0, 0)  # context frames
        after = min(n + w, cache.max_tokens // P) if w else n          # … once w are written
        parts, spans = [], [(0, w, n, True)] * (w > 0) + [(w, T, after, False)] * (w < T)
        for a, z, n, write in spans:          # frames a:z with n context frames, written first
            pos = torch.arange(-n, z - a, device=x.device).repeat_interleave(P)     # (L_k,)
            k = frame0 + a + pos              # key frames; block-causal: a query frame sees those
            q = (k[n * P:, None] // cfg.block + 1) * cfg.block      # before its block's end q,
            mask = (k < q) & (k >= q - cfg.window_frames) if causal else None  # within the window
            parts.append((a, z, pos, mask, write))
        e = timestep_embedding(frame_sigma(sigma, B, T, x.device), cfg.dim)        # (B, T, D)
        c = per_clip(self.t_mlp[2], F.silu(per_clip(self.t_mlp[0], e, parts)), parts)  # t_mlp(e)
        lab = as_labels(label, B, cfg.labels) % (cfg.labels + 1)      # -1: the 'no label' row
        c += self.label_emb(lab.to(x.device))[:, None]                # a frame's condition
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, parts, cache, i)
        shift, scale = per_clip(self.adaLN_out, c, parts)[:, :, None].chunk(2, dim=-1)
        out = self.patch_out(modulate(self.norm_out(h), shift, scale))       # (B, T, P, C·p·p)
        out = out.reshape(B, T, H // p, W // p, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, T, C, H, W)

    def x0(self, x, sigma, label=None, guidance: float = 1.0, **kw):
        """x0_hat = x − σ·v_hat; with `guidance` w ≠ 1 (a float or (B,)) and a label, with
        classifier-free guidance v = v_∅ + w·(v_label − v_∅), both passes in one batch."""
        B, T = x.shape[:2]
        s = frame_sigma(sigma, B, T, x.device)
        w = torch.as_tensor(guidance, dtype=torch.float32, device=x.device)   # () or (B,)
        if label is None or bool((w == 1).all()):
            v = self(x, s, label, **kw)
        else:
            lab = as_labels(label, B, self.cfg.labels)
            v_cond, v_unc = self(torch.cat([x, x]), torch.cat([s, s]),
                                 torch.cat([lab, torch.full_like(lab, -1)]), **kw).chunk(2)
            v = v_unc + w.reshape(-1, 1, 1, 1, 1) * (v_cond - v_unc)
        return x - s[..., None, None, None] * v                     # x0_hat = x_σ − σ·v_hat


# ==== 5. Sampler pieces: noise ε[j, n] per video, the context write ==============================
# Cell (n, j) denoises block n from σ_j (x0_hat = x − σ_j·v_hat) and re-noises x0_hat to
# σ_{j+1} with fresh noise ε[j + 1, n] (SDE-style, as Self-Forcing). ε has a seed per video,
# block and step (EDM's per-sample seeding): every order, pipeline and batch draw the same.

def _cell_seed(seed: int, n: int, j: int) -> int:
    """A well-mixed 63-bit seed for ε[j, n] of a video with seed `seed` (splitmix64)."""
    m = 2 ** 64
    x = (seed * 0x9E3779B97F4A7C15 + (n + 1) * 0xBF58476D1CE4E5B9
         + (j + 1) * 0x94D049BB133111EB) % m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % m
    return (x ^ (x >> 31)) % 2 ** 63


class Noise:
    """ε[j, n] for a batch of videos, one seed per video: `noise(j, n)` → (B, b, 3, H, W).
    Nothing is drawn ahead, so memory does not grow with the video's length."""

    def __init__(self, cfg: Config, seeds, device=None, K: int | None = None):
        self.seeds, self.K, self.device = [int(s) for s in seeds], K or cfg.K, device
        self.shape, self.batch = (cfg.block, 3, cfg.size, cfg.size), len(self.seeds)

    def __call__(self, j: int, n: int) -> torch.Tensor:
        assert 0 <= j < self.K and n >= 0, f"ε[j={j}, n={n}] does not exist (K={self.K})"
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(
            _cell_seed(s, n, j))) for s in self.seeds]).to(self.device)


def write(model: VideoDiT, cache: KVCache, x_c, σ_c, n: int, label, grad: bool = False):
    """Block n at level σ_c becomes context: a pass appends its keys, values (gradient if grad)."""
    b = model.cfg.block
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        model(x_c, σ_c, label, frame0=n * b, cache=cache, write_frames=b)


def _setup(model: VideoDiT, noise, frames: int, exit_step, context_t: str = "next"):
    """(K, N, J, σ): steps, blocks, the last step run (the exit step j* in training), levels."""
    assert context_t in CONTEXT_LEVELS, f"context_t={context_t!r}: one of {CONTEXT_LEVELS}"
    K, b, shape = noise.K, model.cfg.block, (model.cfg.block, 3, model.cfg.size, model.cfg.size)
    assert noise.shape == shape, f"noise draws blocks of {noise.shape}, the model {shape}"
    assert frames % b == 0, f"frames={frames}: whole blocks of {b}"
    J = K - 1 if exit_step is None else exit_step
    assert 0 <= J < K, f"exit_step={exit_step} must be in [0, {K - 1}]"
    return K, frames // b, J, student_sigmas(K, model.cfg.shift)

# ==== 6. Block-major sampler (CausVid / Self-Forcing) =============================================


def block_major(model: VideoDiT, noise: Noise, frames: int, label=None, exit_step=None,
                x0_bias=0.0, cache_grad: bool = False, sink: bool = False):
    """For n: for j: cell (n, j); then one pass caches the clean block (K + 1 passes a block);
    yields each block (B, b, 3, H, W). `exit_step` j* (training) stops every block at j*, the
    only step with gradient (its context writes keep it if `cache_grad`, as the official cache);
    `x0_bias` is added to every x0; `sink`: see KVCache. Context always clean: no context_t."""
    K, N, J, σ = _setup(model, noise, frames, exit_step)
    b, grad, cache = model.cfg.block, torch.is_grad_enabled(), model.new_cache(sink)
    for n in range(N):
        x = noise(0, n)                                               # block n at σ_0 = 1
        for j in range(J + 1):
            with torch.set_grad_enabled(grad and j == J):             # gradient: exit step only
                x0_hat = x - σ[j] * model(x, σ[j], label, frame0=n * b, cache=cache) + x0_bias
            if j < J:
                x = add_noise(x0_hat, noise(j + 1, n), σ[j + 1])      # re-noise to σ_{j+1}
        if n + 1 < N:                                                 # the last is no context
            write(model, cache, x0_hat, 0.0, n, label, cache_grad)    # clean context, t_c = 0
        yield x0_hat


def sample_block_major(model: VideoDiT, noise: Noise, frames: int, label=None, **kw):
    """The whole video (B, frames, 3, H, W) from `block_major`."""
    return torch.cat(list(block_major(model, noise, frames, label, **kw)), 1)

# ==== 7. Step-major sampler (HiAR, paper Alg. 1) ==================================================


def sample_step_major(model: VideoDiT, noise: Noise, frames: int, label=None, context_t="next",
                      exit_step=None, x0_bias=0.0, cache_grad=False, sink=False) -> torch.Tensor:
    """Paper Alg. 1: for each step j a fresh cache; for each block n, cell (n, j), then block n
    is written at the context level t_c (Eq. 9) for the blocks after it; 2K passes a block.
    `context_t` (Table 2): 'next' = t_{j+1} (HiAR's), 'current' = t_j or 'clean' = 0."""
    K, N, J, σ = _setup(model, noise, frames, exit_step, context_t)
    b, grad = model.cfg.block, torch.is_grad_enabled()
    x, out = [noise(0, n) for n in range(N)], [None] * N             # every block at σ_0 = 1
    for j in range(J + 1):                                            # Alg. 1: for each step
        cache = model.new_cache(sink)                                 #   the context of step j
        for n in range(N):                                            #   for each block
            with torch.set_grad_enabled(grad and j == J):
                v_hat = model(x[n], σ[j], label, frame0=n * b, cache=cache)
                x0_hat = x[n] - σ[j] * v_hat + x0_bias
            x_next = add_noise(x0_hat, noise(j + 1, n), σ[j + 1]) if j + 1 < K else x0_hat
            x_c, σ_c = x_next, σ[j + 1]              # Eq. 9: context at the step's output level
            if context_t != "next":                  # Table 2's other levels: t_j, or clean
                x_c, σ_c = (x[n], σ[j]) if context_t == "current" else (x0_hat, 0.0)
            if n + 1 < N:                            # the last block is no one's context
                write(model, cache, x_c, σ_c, n, label, cache_grad and j == J)
            out[n], x[n] = x0_hat, x_next
    return torch.cat(out, 1)


def fused_pass(model: VideoDiT, cache: KVCache, x_c, σ_c, x, σ_j, n: int, label):
    """The paper's fused pass: write block n − 1 (at σ_c) and denoise block n (at σ_j) in one
    forward with per-frame levels → v_hat of block n; a step costs N passes, not 2N. Inference
    only: here block n sees block n − 1's keys *with* their gradient; the cache's are detached."""
    B, b = x.shape[0], model.cfg.block
    xs = torch.cat([x_c, x], 1)                                                 # (B, 2b, …)
    s = torch.cat([frame_sigma(σ_c, B, b, x.device), frame_sigma(σ_j, B, b, x.device)], 1)
    return model(xs, s, label, frame0=(n - 1) * b, cache=cache, write_frames=b)[:, b:]


def step_major(model: VideoDiT, noise: Noise, frames: int, label=None, context_t: str = "next",
               exit_step=None, x0_bias=0.0, fused: bool = False, steps: range | None = None,
               inputs=None, cache_grad: bool = False, sink: bool = False):
    """Step-major as a stream. Cell (n, j) needs only (n − 1, j), via step j's cache, and
    (n, j − 1), its input, so this order (block n's steps before block n + 1's; K caches, one
    block held) gives Alg. 1's video bitwise; at t_j in K passes a block, not 2K. As a pipeline
    stage: run only `steps` on blocks from `inputs`, yield each at σ_{steps[-1] + 1}."""
    K, N, J, σ = _setup(model, noise, frames, exit_step, context_t)
    if fused and torch.is_grad_enabled():           # see fused_pass: its gradients differ
        raise ValueError("fused=True is for inference: run it under torch.no_grad()")
    steps, b, grad = steps or range(J + 1), model.cfg.block, torch.is_grad_enabled()
    cache, held = {j: model.new_cache(sink) for j in steps}, {}      # held: block n − 1's write
    inputs = iter(inputs) if inputs is not None else (noise(0, n) for n in range(N))
    for n in range(N):
        x = next(inputs)                                             # block n at σ_{steps[0]}
        for j in steps:    # t_j: the cell's own pass writes block n (the same input and cache)
            own = context_t == "current" and n + 1 < N and not (grad and j == J)  # grad: write
            with torch.set_grad_enabled(grad and j == J):
                v_hat = (fused_pass(model, cache[j], *held[j], x, σ[j], n, label) if j in held else
                         model(x, σ[j], label, frame0=n * b, cache=cache[j], write_frames=b * own))
                x0_hat = x - σ[j] * v_hat + x0_bias
            x_next = add_noise(x0_hat, noise(j + 1, n), σ[j + 1]) if j + 1 < K else x0_hat
            x_c, σ_c = x_next, σ[j + 1]                             # Eq. 9, as above
            if context_t != "next":
                x_c, σ_c = (x, σ[j]) if context_t == "current" else (x0_hat, 0.0)
            if fused and not own:
                held[j] = (x_c.detach(), σ_c)                        # written by the next pass
            elif n + 1 < N and not own:
                write(model, cache[j], x_c, σ_c, n, label, cache_grad and j == J)
            x = x_next
        yield x0_hat if steps[-1] == J else x

# ==== 8. The wavefront: a pipeline of threads, or a batched pass per anti-diagonal ===============
# Cells on one anti-diagonal n + j are independent: in a pipeline, stream s owns a group of steps
# (a KV cache each) and runs block n in slot n + s, N + S − 1 slots instead of N·S (processes:
# sample.distributed); on one device a diagonal's cells run as one batched pass (Stream Batch).


def step_groups(K: int, S: int) -> list[range]:
    """Split steps 0..K−1 into S contiguous groups, as even as possible."""
    assert 1 <= S <= K, f"streams={S} must be in [1, K={K}]"
    edges = [round(s * K / S) for s in range(S + 1)]
    return [range(edges[s], edges[s + 1]) for s in range(S)]


@torch.no_grad()
def pipelined(model: VideoDiT, noise: Noise, frames: int, label=None, context_t: str = "next",
              streams: int = 2, threads_per_stream: int | None = 1, fused: bool = False,
              depth: int = 2, sink: bool = False):
    """Step-major as a wavefront: `streams` threads (on a GPU, CUDA streams), a stage each, joined
    by queues of `depth` blocks: step_major's video, bitwise on the CPU at `threads_per_stream`."""
    groups, N = step_groups(noise.K, streams), frames // model.cfg.block
    pipes = [queue.Queue(maxsize=depth) for _ in range(streams + 1)]  # pipes[s]: into stage s
    stop, caller_threads = threading.Event(), torch.get_num_threads()
    cuda = torch.device(noise.device or "cpu").type == "cuda"

    def put(q, item):                                  # wait for room, unless told to stop
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                return q.put(item, timeout=0.05)

    def take(q):
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                item = q.get(timeout=0.05)
                if isinstance(item, BaseException):    # a stage upstream failed: raise it here
                    raise item
                return item
        raise RuntimeError("pipeline stopped")

    def stage(s):                                      # stream s: its steps on every block
        try:
            torch.set_num_threads(threads_per_stream or torch.get_num_threads())   # None: as is
            own = torch.cuda.stream(torch.cuda.Stream(noise.device)) if cuda else None
            inputs = (noise(0, n) if s == 0 else take(pipes[s]) for n in range(N))
            with torch.no_grad(), own or contextlib.nullcontext():
                for x in step_major(model, noise, frames, label, context_t, fused=fused,
                                    steps=groups[s], inputs=inputs, sink=sink):
                    if cuda:
                        torch.cuda.current_stream().synchronize()    # x is ready downstream
                    put(pipes[s + 1], x)
                    if stop.is_set():                  # the caller stopped: no more blocks
                        return
        except BaseException as e:                     # hand the failure on to the caller
            put(pipes[s + 1], e)

    pool = [threading.Thread(target=stage, args=(s,), daemon=True) for s in range(streams)]
    for t in pool:
        t.start()
    try:
        for _ in range(N):
            yield take(pipes[streams])
    finally:
        stop.set()                                     # also when the caller stops early
        for t in pool:
            t.join()
        torch.set_num_threads(caller_threads)


def sample_pipelined(model: VideoDiT, noise: Noise, frames: int, label=None, **kw):
    """The whole video (B, frames, 3, H, W) from `pipelined`."""
    return torch.cat(list(pipelined(model, noise, frames, label, **kw)), 1)


@torch.no_grad()
def wavefront(model: VideoDiT, noise: Noise, frames: int, label=None, context_t: str = "next",
              exit_step=None, x0_bias=0.0, sink: bool = False):
    """Step-major on one device: the cells of an anti-diagonal whose caches hold as many frames run
    as one pass, a row group per step with its own cache; a cell is step_major's fused pass."""
    K, N, J, σ = _setup(model, noise, frames, exit_step, context_t)
    B, b, own, clean = noise.batch, model.cfg.block, context_t == "current", context_t == "clean"
    lab, σ_row = as_labels(label, B, model.cfg.labels), [torch.full((B,), s) for s in σ]
    cache, x, x_c, σ_c = [model.new_cache(sink) for _ in range(J + 1)], {0: noise(0, 0)}, {}, {}
    for d in range(N + J):                                             # anti-diagonal n + j = d
        x_new, groups = {0: noise(0, d + 1)} if d + 1 < N else {}, {}
        for j in x:                               # the cells as far into their windows: a pass
            groups.setdefault((len(cache[j]), j in x_c), []).append(j)
        for js in groups.values():
            n, R, c = d - js[0], len(js), model.new_cache(sink)          # their caches as one
            c.k = [t[0] if R == 1 else torch.cat(t) for t in zip(*(cache[j].k for j in js))]
            c.v = [t[0] if R == 1 else torch.cat(t) for t in zip(*(cache[j].v for j in js))]
            rows = lambda a: torch.cat([a[j] for j in js])                # noqa: E731 (R·B, …)
            v_hat = fused_pass(model, c, rows(x_c), rows(σ_c), rows(x), rows(σ_row), n,
                               lab.repeat(R)) if js[0] in x_c else model(
                rows(x), rows(σ_row), lab.repeat(R), frame0=n * b, cache=c, write_frames=b * own)
            for i, j in enumerate(js):                            # each step its rows back
                cache[j].k = [t if R == 1 else t.chunk(R)[i] for t in c.k]
                cache[j].v = [t if R == 1 else t.chunk(R)[i] for t in c.v]
            for j, v in zip(js, v_hat.split(B)):          # cell (d − j, j), as in step_major
                x0_hat = x[j] - σ[j] * v + x0_bias
                x_next = add_noise(x0_hat, noise(j + 1, d - j), σ[j + 1]) if j + 1 < K else x0_hat
                if not own:                      # Eq. 9: block n's context, its next pass writes
                    x_c[j], σ_c[j] = (x0_hat, σ_row[K]) if clean else (x_next, σ_row[j + 1])
                if j < J:
                    x_new[j + 1] = x_next                               # cell (d − j, j + 1)
                else:
                    yield x0_hat
        x = x_new


# ==== 9. Losses ===================================================================================

def flow_loss(model, x0, sigma, eps, label=None, causal: bool = False, n=None):
    """Flow matching, L = ‖v_θ(x_σ, σ, label) − (ε − x0)‖², σ (B,): the teacher
    (labels dropped for CFG), the critic; with blocks n (B,) an AR teacher (see teacher_forced)."""
    x_t = add_noise(x0, eps, sigma[:, None, None, None, None])
    if n is None:
        return F.mse_loss(model(x_t, sigma, label, causal=causal), eps - x0)
    x_t, s, on = teacher_forced(x0, x_t, sigma, n, model.cfg.block)
    return (model(x_t, s, label, causal=True) - (eps - x0)).pow(2).mean((2, 3, 4))[on].mean()


def teacher_forced(context, x, sigma, n, block: int):
    """Teacher forcing (Causal Forcing): clip i's blocks before n[i] from the clean `context`,
    the rest from x at σ[i]; σ, n (B,) or scalars → (input, levels (B, T), block n's mask)."""
    blk = torch.arange(x.shape[1], device=x.device) // block                        # (T,)
    n = torch.as_tensor(n, device=x.device).reshape(-1, 1)                          # (B or 1, 1)
    past, s = blk < n, torch.as_tensor(sigma, device=x.device).float().reshape(-1, 1)
    x_in = torch.where(past[..., None, None, None], context, x)                     # (B, T, …)
    return x_in, torch.where(past, 0.0, s).expand(len(x), -1), blk == n


@torch.no_grad()
def teacher_ode(teacher: VideoDiT, eps, keep: list[float], steps: int = 48, shift: float = 8.0,
                label=None, guidance: float = 1.0, context=None):
    """The teacher's ODE dx/dσ = v from σ = 1 to 0 with CFG, Euler on a shifted grid (official 48
    steps, shift 8) via `keep`: eps (B, T, 3, H, W) → (states (B, len(keep), T, …), x0). With a
    clean `context` (B, T, …), an AR teacher solves one block at a time, teacher-forced."""
    grid = [float(shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]
    grid = sorted({round(s, 7) for s in grid + list(keep)}, reverse=True)
    want, T, b = {round(s, 7): i for i, s in enumerate(keep)}, eps.shape[1], teacher.cfg.block
    x, states = eps, eps.new_zeros(len(eps), len(keep), *eps.shape[1:])
    blk = torch.arange(T, device=eps.device)[:, None, None, None] // b              # (T, 1, 1, 1)
    for n in range(T // b) if context is not None else [None]:       # None: all frames at once
        f, on = (T, blk >= 0) if n is None else ((n + 1) * b, blk == n)   # frames seen, solved
        for a, z in zip(grid[:-1], grid[1:]):
            if a in want:
                states[:, want[a]] = torch.where(on, x, states[:, want[a]])
            xs, σ = (x, a) if n is None else teacher_forced(context[:, :f], x[:, :f], a, n, b)[:2]
            x0_hat = teacher.x0(xs, σ, label, guidance, causal=n is not None)
            x0_hat = torch.cat([x0_hat, x[:, f:]], 1)              # the frames after f: unused
            x = torch.where(on, x + (z - a) * (x - x0_hat) / a, x)     # v = (x − x0_hat) / σ
    return states, x


def dmd_sigma(B: int, shift: float, generator=None, device=None, t_min: float = 0.02,
              t_max: float = 0.98):
    """Where DMD queries both scores and the critic trains (one distribution, as the official
    code): t ~ U[0, 1], σ = shift(t), clamped to [t_min, t_max] *after* the shift. (B,)"""
    t = torch.rand(B, generator=generator)
    return shift_sigma(t, shift).clamp(t_min, t_max).to(device)


def dmd_loss(x0, teacher: VideoDiT, critic: VideoDiT, shift: float, label=None,
             guidance: float = 1.0, generator=None, guidance_sigmas=(0.0, 1.0)):
    """DMD, the paper's reverse-KL term (after DMD2, Self-Forcing): diffuse the student's x0
    (B, T, 3, H, W) to σ (`dmd_sigma`); read the real score (teacher, CFG `guidance` at σ in
    the interval `guidance_sigmas`: Kynkäänniemi et al. 2024) and the fake score (critic); then
        grad = (x0_fake − x0_real) / mean|x0 − x0_real|, L = ½·‖x0 − sg(x0 − grad)‖²:
    ∂L/∂x0 ∝ grad moves x0 where the teacher's distribution is denser than the student's."""
    with torch.no_grad():
        sigma = dmd_sigma(x0.shape[0], shift, generator, x0.device)          # (B,)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = add_noise(x0, eps, sigma[:, None, None, None, None])
        lo, hi = guidance_sigmas
        w = torch.where((sigma >= lo) & (sigma <= hi), guidance, 1.0)       # (B,)
        x0_real = teacher.x0(x_t, sigma, label, w, causal=False)
        x0_fake = critic.x0(x_t, sigma, label, causal=False)
        norm = (x0 - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def chord_x0(x_a, x_b, sigma_a: float, sigma_b: float):
    """The x0 that carries x_a (σ_a) to x_b (σ_b) on a line: the chord of the teacher's ODE."""
    return x_a - sigma_a * (x_a - x_b) / (sigma_a - sigma_b)


def fkl_loss(student: VideoDiT, x_start, x0_target, sigma0: float = 1.0, label=None,
             bidirectional: bool = True):
    """Forward KL (Eq. 10-11): L_FKL = ‖x0_θ(x_σ0) − x0_ODE‖², first step on teacher ODE;
    loss L_DMD + λ·L_FKL, λ = 0.1. Bidirectional as the paper (official code: causal)."""
    return F.mse_loss(student.x0(x_start, sigma0, label, causal=not bidirectional), x0_target)
